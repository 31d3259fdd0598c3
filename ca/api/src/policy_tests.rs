use super::*;

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn spec(yaml: &str) -> MeshPolicySpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn inbound(default_policy: DefaultPolicy, policies: Vec<(&str, &str)>) -> InboundPolicy {
    InboundPolicy {
        trust_domain: "cluster.local".into(),
        workload: "shop/api".into(),
        namespace: "shop".into(),
        default_policy,
        policies: policies
            .into_iter()
            .map(|(name, yaml)| {
                let s = spec(yaml);
                ResolvedPolicy {
                    name: name.into(),
                    ports: s.ports,
                    mode: s.mode,
                    allow: s.allow,
                }
            })
            .collect(),
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const MON: &str = "spiffe://cluster.local/ns/monitoring/sa/prom";
const EVIL: &str = "spiffe://cluster.local/ns/shop/sa/evil";
const FOREIGN: &str = "spiffe://other.domain/ns/shop/sa/web";

#[test]
fn defaults_decide_without_policies() {
    let web = id(WEB);
    let cases = [
        (
            DefaultPolicy::Deny,
            Caller::Authenticated(&web),
            false,
            Reason::DefaultDeny,
        ),
        (
            DefaultPolicy::AllAuthenticated,
            Caller::Authenticated(&web),
            true,
            Reason::DefaultAllAuthenticated,
        ),
        (
            DefaultPolicy::AllAuthenticated,
            Caller::Unauthenticated,
            false,
            Reason::PlaintextNotAllowed,
        ),
        (
            DefaultPolicy::All,
            Caller::Unauthenticated,
            true,
            Reason::DefaultAll,
        ),
    ];
    for (default, caller, allowed, reason) in cases {
        let d = evaluate_inbound(&inbound(default, vec![]), 8080, caller);
        assert_eq!(
            (d.allowed, d.reason),
            (allowed, reason),
            "{default:?} {caller:?}"
        );
        assert_eq!(d.policy, format!("default:{}", default.as_str()));
    }
}

#[test]
fn foreign_trust_domain_is_not_authenticated_here() {
    let foreign = id(FOREIGN);
    let d = evaluate_inbound(
        &inbound(DefaultPolicy::AllAuthenticated, vec![]),
        80,
        Caller::Authenticated(&foreign),
    );
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::ForeignTrustDomain);
    let p = inbound(
        DefaultPolicy::All,
        vec![("shop/p", "allow: [{serviceAccounts: [shop/web]}]")],
    );
    assert!(!evaluate_inbound(&p, 80, Caller::Authenticated(&foreign)).allowed);
}

#[test]
fn selecting_policy_replaces_the_default() {
    let p = inbound(
        DefaultPolicy::All,
        vec![(
            "shop/api-from-web",
            "{ports: [8080], allow: [{serviceAccounts: [shop/web]}, {namespaces: [monitoring]}]}",
        )],
    );
    let (web, mon, evil) = (id(WEB), id(MON), id(EVIL));
    assert!(evaluate_inbound(&p, 8080, Caller::Authenticated(&web)).allowed);
    assert!(evaluate_inbound(&p, 8080, Caller::Authenticated(&mon)).allowed);
    let denied = evaluate_inbound(&p, 8080, Caller::Authenticated(&evil));
    assert!(!denied.allowed);
    assert_eq!(denied.reason, Reason::NoRuleMatched);
    assert_eq!(denied.policy, "shop/api-from-web");
    assert_eq!(denied.result(), "deny");
    assert!(!evaluate_inbound(&p, 8080, Caller::Unauthenticated).allowed);
    // Another port is not covered: the default (all) decides.
    let other = evaluate_inbound(&p, 9090, Caller::Unauthenticated);
    assert!(other.allowed);
    assert_eq!(other.reason, Reason::DefaultAll);
}

#[test]
fn namespace_wildcard_and_authenticated_rules() {
    let p = inbound(
        DefaultPolicy::Deny,
        vec![("shop/a", "allow: [{serviceAccounts: ['shop/*']}]")],
    );
    assert!(evaluate_inbound(&p, 1, Caller::Authenticated(&id(EVIL))).allowed);
    assert!(!evaluate_inbound(&p, 1, Caller::Authenticated(&id(MON))).allowed);
    let p = inbound(
        DefaultPolicy::Deny,
        vec![("shop/a", "allow: [{authenticated: true}]")],
    );
    assert!(evaluate_inbound(&p, 1, Caller::Authenticated(&id(MON))).allowed);
    assert!(!evaluate_inbound(&p, 1, Caller::Unauthenticated).allowed);
    let p = inbound(
        DefaultPolicy::Deny,
        vec![("shop/a", "allow: [{unauthenticated: true}]")],
    );
    assert!(evaluate_inbound(&p, 1, Caller::Unauthenticated).allowed);
    assert!(evaluate_inbound(&p, 1, Caller::Authenticated(&id(MON))).allowed);
}

#[test]
fn a_policy_with_no_rules_denies_everyone() {
    let p = inbound(DefaultPolicy::All, vec![("shop/lockdown", "{}")]);
    assert!(!evaluate_inbound(&p, 1, Caller::Authenticated(&id(WEB))).allowed);
}

#[test]
fn any_enforcing_policy_may_allow() {
    let p = inbound(
        DefaultPolicy::Deny,
        vec![
            ("shop/a", "allow: [{serviceAccounts: [shop/web]}]"),
            ("shop/b", "allow: [{namespaces: [monitoring]}]"),
        ],
    );
    let d = evaluate_inbound(&p, 1, Caller::Authenticated(&id(MON)));
    assert!(d.allowed);
    assert_eq!(d.policy, "shop/b");
    let d = evaluate_inbound(&p, 1, Caller::Authenticated(&id(EVIL)));
    assert_eq!(d.policy, "shop/a,shop/b");
}

#[test]
fn audit_policy_logs_but_never_refuses() {
    let p = inbound(
        DefaultPolicy::AllAuthenticated,
        vec![(
            "shop/trial",
            "{mode: audit, allow: [{serviceAccounts: [shop/web]}]}",
        )],
    );
    let d = evaluate_inbound(&p, 1, Caller::Authenticated(&id(EVIL)));
    assert!(d.allowed);
    assert!(d.audit_would_deny);
    assert_eq!(d.result(), "audit_deny");
    assert_eq!(d.policy, "shop/trial");
    let d = evaluate_inbound(&p, 1, Caller::Authenticated(&id(WEB)));
    assert!(d.allowed && !d.audit_would_deny);
    // The default still decides what audit cannot: plaintext stays refused.
    let d = evaluate_inbound(&p, 1, Caller::Unauthenticated);
    assert!(!d.allowed);
}

#[test]
fn audit_does_not_weaken_an_enforcing_policy() {
    let p = inbound(
        DefaultPolicy::All,
        vec![
            ("shop/enforced", "allow: [{serviceAccounts: [shop/web]}]"),
            (
                "shop/trial",
                "{mode: audit, allow: [{authenticated: true}]}",
            ),
        ],
    );
    assert!(!evaluate_inbound(&p, 1, Caller::Authenticated(&id(EVIL))).allowed);
}

#[test]
fn selectors_pick_workloads() {
    let policies = vec![
        NamedPolicy {
            name: "api".into(),
            namespace: "shop".into(),
            spec: spec("targetSelector: {matchLabels: {app: api}}"),
        },
        NamedPolicy {
            name: "all".into(),
            namespace: "shop".into(),
            spec: spec("{}"),
        },
        NamedPolicy {
            name: "other-ns".into(),
            namespace: "bank".into(),
            spec: spec("{}"),
        },
        NamedPolicy {
            name: "expr".into(),
            namespace: "shop".into(),
            spec: spec(
                "targetSelector: {matchExpressions: [{key: tier, operator: In, values: [back]}, {key: canary, operator: DoesNotExist}]}",
            ),
        },
    ];
    let names = |l: &[(&str, &str)]| -> Vec<String> {
        policies_selecting(&policies, "shop", &labels(l))
            .into_iter()
            .map(|p| p.name)
            .collect()
    };
    assert_eq!(names(&[("app", "api")]), ["shop/all", "shop/api"]);
    assert_eq!(
        names(&[("app", "web"), ("tier", "back")]),
        ["shop/all", "shop/expr"]
    );
    assert_eq!(names(&[("tier", "back"), ("canary", "yes")]), ["shop/all"]);
}

#[test]
fn selector_operators() {
    let sel: LabelSelector = serde_yaml::from_str(
        "matchExpressions: [{key: a, operator: NotIn, values: [x]}, {key: b, operator: Exists}]",
    )
    .unwrap();
    assert!(sel.selects(&labels(&[("b", "1")])));
    assert!(!sel.selects(&labels(&[("a", "x"), ("b", "1")])));
    assert!(!sel.selects(&labels(&[("a", "y")])));
    let bad: LabelSelector =
        serde_yaml::from_str("matchExpressions: [{key: a, operator: In}]").unwrap();
    assert!(bad.validate().unwrap_err().contains("needs values"));
}

#[test]
fn malformed_rules_say_what_is_accepted() {
    for (yaml, expect) in [
        ("allow: [{}]", "exactly one of"),
        (
            "allow: [{authenticated: true, namespaces: [a]}]",
            "exactly one of",
        ),
        ("allow: [{serviceAccounts: [web]}]", "namespace/name"),
        ("allow: [{serviceAccounts: []}]", "at least one"),
        ("allow: [{namespaces: [Bad_NS]}]", "DNS label"),
        ("allow: [{authenticated: false}]", "may only be true"),
        ("allow: [{users: [x]}]", "unknown field"),
        ("mode: strict", "unknown variant"),
    ] {
        let err = serde_yaml::from_str::<MeshPolicySpec>(yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{yaml}: {err}");
    }
}

#[test]
fn rules_round_trip_through_json() {
    let s = spec(
        "{ports: [80], mode: audit, allow: [{serviceAccounts: ['shop/*', shop/web]}, {namespaces: [m]}, {authenticated: true}, {unauthenticated: true}]}",
    );
    let json = serde_json::to_string(&s).unwrap();
    assert!(
        json.contains(r#"{"serviceAccounts":["shop/*","shop/web"]}"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<MeshPolicySpec>(&json).unwrap(), s);
}
