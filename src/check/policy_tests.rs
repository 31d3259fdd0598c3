use serde_json::json;

use super::*;
use crate::check::snapshot::Undecoded;
use crate::check::test_support::{app_pod, empty, namespace};

fn rule(v: serde_json::Value) -> AllowRule {
    serde_json::from_value(v).unwrap()
}

fn mesh_policy(
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> palisade_ca::kube::crd::MeshPolicy {
    serde_json::from_value(json!({
        "apiVersion": "palisade.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .unwrap()
}

/// shop (with pods api and web, meshed), monitoring; service accounts shop/web, shop/api.
fn cluster(policies: Vec<palisade_ca::kube::crd::MeshPolicy>) -> ClusterSnapshot {
    let mut s = empty();
    s.namespaces.push(namespace(
        "shop",
        json!({"palisade.dev/inject": "enabled"}),
        json!({}),
    ));
    s.namespaces
        .push(namespace("monitoring", json!({}), json!({})));
    s.pods = vec![app_pod("shop", "api", true), app_pod("shop", "web", true)];
    s.service_accounts = Ok(["web", "api"]
        .iter()
        .map(|sa| {
            serde_json::from_value(json!({"metadata": {"name": sa, "namespace": "shop"}})).unwrap()
        })
        .collect());
    s.policies = Ok(policies.into_iter().map(Ok).collect());
    s
}

fn failing(results: &[CheckResult], check: &str) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.ok && r.check == check)
        .map(|r| r.message.clone())
        .collect()
}

#[test]
fn rule_coverage_follows_the_evaluator() {
    let sa = rule(json!({"serviceAccounts": ["shop/web"]}));
    let whole_ns = rule(json!({"serviceAccounts": ["shop/*"]}));
    let ns = rule(json!({"namespaces": ["shop"]}));
    let authenticated = rule(json!({"authenticated": true}));
    let anyone = rule(json!({"unauthenticated": true}));
    assert!(rule_covered(&sa, std::slice::from_ref(&whole_ns)));
    assert!(rule_covered(&whole_ns, std::slice::from_ref(&ns)));
    assert!(
        !rule_covered(&whole_ns, std::slice::from_ref(&sa)),
        "shop/* admits more than shop/web"
    );
    assert!(rule_covered(&ns, std::slice::from_ref(&authenticated)));
    assert!(!rule_covered(&authenticated, std::slice::from_ref(&ns)));
    assert!(
        rule_covered(&authenticated, std::slice::from_ref(&anyone)),
        "unauthenticated admits mesh identities too"
    );
    assert!(
        !rule_covered(&anyone, std::slice::from_ref(&authenticated)),
        "plaintext callers are not authenticated"
    );
    assert!(!rule_covered(
        &sa,
        &[rule(json!({"serviceAccounts": ["shop/api"]}))]
    ));
    assert!(!rule_covered(&sa, &[]));
}

#[test]
fn identical_policies_report_the_later_one_once() {
    let spec = json!({"targetSelector": {"matchLabels": {"app": "api"}}, "ports": [8080], "allow": [{"serviceAccounts": ["shop/web"]}]});
    let results = check(&cluster(vec![
        mesh_policy("shop", "api-a", spec.clone()),
        mesh_policy("shop", "api-b", spec),
    ]));
    let shadowed = failing(&results, "policy-shadowed");
    assert_eq!(shadowed.len(), 1, "{results:#?}");
    assert!(
        shadowed[0].starts_with("MeshPolicy shop/api-b is shadowed by api-a"),
        "{shadowed:?}"
    );
}

#[test]
fn a_broader_policy_shadows_a_narrower_one_but_not_the_reverse() {
    let narrow = json!({"targetSelector": {"matchLabels": {"app": "api"}}, "ports": [8080], "allow": [{"serviceAccounts": ["shop/web"]}]});
    let broad = json!({"allow": [{"namespaces": ["shop"]}]});
    let results = check(&cluster(vec![
        mesh_policy("shop", "narrow", narrow.clone()),
        mesh_policy("shop", "broad", broad.clone()),
    ]));
    assert_eq!(failing(&results, "policy-shadowed").len(), 1);
    assert!(failing(&results, "policy-shadowed")[0].contains("shop/narrow is shadowed by broad"));
    // An audit policy does not make an enforcing one redundant: without it the default decides.
    let mut audit = broad;
    audit["mode"] = json!("audit");
    let results = check(&cluster(vec![
        mesh_policy("shop", "narrow", narrow),
        mesh_policy("shop", "broad", audit),
    ]));
    assert!(
        failing(&results, "policy-shadowed").is_empty(),
        "{results:#?}"
    );
}

#[test]
fn different_ports_or_callers_do_not_shadow() {
    let a = json!({"targetSelector": {"matchLabels": {"app": "api"}}, "ports": [8080], "allow": [{"serviceAccounts": ["shop/web"]}]});
    let mut other_port = a.clone();
    other_port["ports"] = json!([9090]);
    let mut other_caller = a.clone();
    other_caller["allow"] = json!([{"serviceAccounts": ["shop/api"]}]);
    let results = check(&cluster(vec![
        mesh_policy("shop", "a", a),
        mesh_policy("shop", "b", other_port),
        mesh_policy("shop", "c", other_caller),
    ]));
    assert!(
        failing(&results, "policy-shadowed").is_empty(),
        "{results:#?}"
    );
    assert!(results.iter().any(|r| r.ok && r.check == "policies"));
}

#[test]
fn a_policy_that_selects_no_meshed_pod_is_named() {
    let mut s = cluster(vec![mesh_policy(
        "shop",
        "old",
        json!({"targetSelector": {"matchLabels": {"app": "cart"}}}),
    )]);
    assert_eq!(
        failing(&check(&s), "policy-selects-nothing"),
        ["MeshPolicy shop/old selects no meshed pod"]
    );
    s.pods.push(app_pod("shop", "cart", false));
    let found = failing(&check(&s), "policy-selects-nothing");
    assert!(
        found[0].contains("1 pods match its selector but run without the proxy"),
        "{found:?}"
    );
}

#[test]
fn missing_namespaces_and_service_accounts_are_named() {
    let results = check(&cluster(vec![mesh_policy(
        "shop",
        "api",
        json!({"targetSelector": {"matchLabels": {"app": "api"}},
               "allow": [{"serviceAccounts": ["shop/web", "shop/wbe", "billing/*"]}, {"namespaces": ["monitoring", "monitorng"]}]}),
    )]));
    let found = failing(&results, "policy-unknown-reference");
    assert_eq!(found.len(), 1, "{results:#?}");
    assert!(
        found[0].contains(
            "service account shop/wbe, namespace billing (in billing/*), namespace monitorng"
        ),
        "{found:?}"
    );
}

#[test]
fn a_policy_the_ca_ignores_is_one_red_line() {
    let mut s = cluster(vec![mesh_policy(
        "shop",
        "zero",
        json!({"ports": [0], "allow": [{"authenticated": true}]}),
    )]);
    s.policies.as_mut().unwrap().push(Err(Undecoded {
        kind: "meshpolicies",
        name: "shop/garbled".into(),
        error: "unknown field `alow`".into(),
    }));
    let found = failing(&check(&s), "policy-malformed");
    assert_eq!(
        found,
        [
            "MeshPolicy shop/zero is ignored by the CA: port 0 is not a port",
            "MeshPolicy shop/garbled is ignored by the CA: unknown field `alow`",
        ]
    );
}

#[test]
fn invalid_default_policy_annotations_are_named_with_the_accepted_values() {
    let mut s = cluster(Vec::new());
    s.namespaces.push(namespace(
        "typo",
        json!({}),
        json!({"palisade.dev/default-policy": "allow"}),
    ));
    s.namespaces.push(namespace(
        "fine",
        json!({}),
        json!({"palisade.dev/default-policy": "deny"}),
    ));
    let results = check(&s);
    let found: Vec<&CheckResult> = results.iter().filter(|r| !r.ok).collect();
    assert_eq!(found.len(), 1, "{results:#?}");
    assert_eq!(found[0].check, "namespace-default-policy");
    assert!(found[0].message.starts_with(
        "namespace typo: annotation palisade.dev/default-policy: \"allow\" is not a default policy"
    ));
    assert!(
        found[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("deny, all-authenticated or all")
    );
}

#[test]
fn no_policies_crd_leaves_the_policy_lines_to_the_crd_check() {
    let mut s = cluster(Vec::new());
    s.policies = Err(ListError::NotServed);
    assert!(check(&s).iter().all(|r| r.ok));
}
