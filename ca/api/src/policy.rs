//! The policy model (`MeshPolicy` spec, default policies) and inbound evaluation.
//!
//! Everything here is a pure function over plain data: the CA resolves which policies select a
//! workload, the proxy evaluates each connection, `palisade policy check` does both.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// What happens when no `MeshPolicy` selects a workload and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Refuse every caller.
    Deny,
    /// Admit any caller with a mesh identity; refuse plaintext callers.
    #[default]
    AllAuthenticated,
    /// Admit everyone, plaintext callers too.
    All,
}

impl DefaultPolicy {
    pub const ACCEPTED: &'static str = "deny, all-authenticated or all";

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::All => "all",
        }
    }
}

impl std::str::FromStr for DefaultPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(DefaultPolicy::Deny),
            "all-authenticated" => Ok(DefaultPolicy::AllAuthenticated),
            "all" => Ok(DefaultPolicy::All),
            other => Err(format!(
                "{other:?} is not a default policy: use {}",
                DefaultPolicy::ACCEPTED
            )),
        }
    }
}

/// `enforce` refuses what no rule allows; `audit` only logs and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Audit,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Whether a set of labels is selected; the empty selector selects everything.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|req| {
                let value = labels.get(&req.key);
                match req.operator {
                    SelectorOperator::In => value.is_some_and(|v| req.values.contains(v)),
                    SelectorOperator::NotIn => !value.is_some_and(|v| req.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// Checks what the API server would: `In`/`NotIn` need values, `Exists`/`DoesNotExist` none.
    pub fn validate(&self) -> Result<(), String> {
        for (i, req) in self.match_expressions.iter().enumerate() {
            let needs_values =
                matches!(req.operator, SelectorOperator::In | SelectorOperator::NotIn);
            if needs_values == req.values.is_empty() {
                return Err(format!(
                    "matchExpressions[{i}]: operator {:?} {} values",
                    req.operator,
                    if needs_values { "needs" } else { "takes no" }
                ));
            }
        }
        Ok(())
    }
}

/// One allow rule: exactly one of its forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawAllowRule", into = "RawAllowRule")]
pub enum AllowRule {
    /// `serviceAccounts: ["ns/sa", "ns/*"]`
    ServiceAccounts(Vec<ServiceAccountPattern>),
    /// `namespaces: ["ns"]`
    Namespaces(Vec<String>),
    /// `authenticated: true` — any mesh identity.
    Authenticated,
    /// `unauthenticated: true` — plaintext callers (and everyone else).
    Unauthenticated,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAllowRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_accounts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authenticated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unauthenticated: Option<bool>,
}

const RULE_FORMS: &str = "an allow rule is exactly one of {serviceAccounts: [\"ns/sa\" or \"ns/*\", ...]}, {namespaces: [\"ns\", ...]}, {authenticated: true} or {unauthenticated: true}";

impl TryFrom<RawAllowRule> for AllowRule {
    type Error = String;

    fn try_from(raw: RawAllowRule) -> Result<Self, String> {
        let forms = [
            raw.service_accounts.is_some(),
            raw.namespaces.is_some(),
            raw.authenticated.is_some(),
            raw.unauthenticated.is_some(),
        ];
        if forms.iter().filter(|f| **f).count() != 1 {
            return Err(RULE_FORMS.to_owned());
        }
        if let Some(list) = raw.service_accounts {
            if list.is_empty() {
                return Err("serviceAccounts is empty: list at least one \"ns/sa\"".into());
            }
            let patterns = list
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<ServiceAccountPattern>, String>>()?;
            return Ok(AllowRule::ServiceAccounts(patterns));
        }
        if let Some(list) = raw.namespaces {
            if list.is_empty() {
                return Err("namespaces is empty: list at least one namespace".into());
            }
            for ns in &list {
                crate::spiffe::validate_namespace(ns).map_err(|e| e.to_string())?;
            }
            return Ok(AllowRule::Namespaces(list));
        }
        match (raw.authenticated, raw.unauthenticated) {
            (Some(true), _) => Ok(AllowRule::Authenticated),
            (_, Some(true)) => Ok(AllowRule::Unauthenticated),
            _ => Err(
                "authenticated/unauthenticated may only be true; omit the rule to not allow".into(),
            ),
        }
    }
}

impl From<AllowRule> for RawAllowRule {
    fn from(rule: AllowRule) -> Self {
        let mut raw = RawAllowRule::default();
        match rule {
            AllowRule::ServiceAccounts(p) => {
                raw.service_accounts = Some(p.iter().map(ToString::to_string).collect())
            }
            AllowRule::Namespaces(n) => raw.namespaces = Some(n),
            AllowRule::Authenticated => raw.authenticated = Some(true),
            AllowRule::Unauthenticated => raw.unauthenticated = Some(true),
        }
        raw
    }
}

/// `ns/sa` or `ns/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountPattern {
    pub namespace: String,
    /// `None` matches every service account of the namespace.
    pub service_account: Option<String>,
}

impl std::str::FromStr for ServiceAccountPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?} is not a service account: write \"namespace/name\" or \"namespace/*\"")
        };
        let (ns, sa) = s.split_once('/').ok_or_else(bad)?;
        crate::spiffe::validate_namespace(ns).map_err(|_| bad())?;
        if sa == "*" {
            return Ok(ServiceAccountPattern {
                namespace: ns.into(),
                service_account: None,
            });
        }
        crate::spiffe::validate_service_account(sa).map_err(|_| bad())?;
        Ok(ServiceAccountPattern {
            namespace: ns.into(),
            service_account: Some(sa.into()),
        })
    }
}

impl fmt::Display for ServiceAccountPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.namespace,
            self.service_account.as_deref().unwrap_or("*")
        )
    }
}

/// The `spec` of a `MeshPolicy` (group `palisade.dev`, version `v1alpha1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPolicySpec {
    #[serde(default)]
    pub target_selector: LabelSelector,
    /// Ports the policy covers; empty covers all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// A `MeshPolicy` as the control plane holds it: its name, namespace and spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    pub namespace: String,
    pub spec: MeshPolicySpec,
}

/// A policy that selects one workload, as the proxy receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedPolicy {
    /// `namespace/name` of the MeshPolicy.
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub mode: PolicyMode,
    pub allow: Vec<AllowRule>,
}

/// The policies of `namespace` whose selector matches `labels`, in name order.
pub fn policies_selecting(
    policies: &[NamedPolicy],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<ResolvedPolicy> {
    let mut out: Vec<ResolvedPolicy> = policies
        .iter()
        .filter(|p| p.namespace == namespace && p.spec.target_selector.selects(labels))
        .map(|p| ResolvedPolicy {
            name: format!("{}/{}", p.namespace, p.name),
            ports: p.spec.ports.clone(),
            mode: p.spec.mode,
            allow: p.spec.allow.clone(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Everything a proxy needs to decide on its inbound connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundPolicy {
    pub trust_domain: String,
    /// `namespace/name` of the workload this policy protects.
    pub workload: String,
    pub namespace: String,
    /// The namespace annotation `palisade.dev/default-policy`, else the mesh default.
    pub default_policy: DefaultPolicy,
    pub policies: Vec<ResolvedPolicy>,
}

/// Who is calling.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    Authenticated(&'a SpiffeId),
    Unauthenticated,
}

/// Why a decision came out as it did; also the `reason` label of the decision metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    RuleMatched,
    NoRuleMatched,
    DefaultAll,
    DefaultAllAuthenticated,
    DefaultDeny,
    PlaintextNotAllowed,
    ForeignTrustDomain,
    /// The proxy has no policy from the control plane yet: it refuses (fail closed).
    NoPolicyYet,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RuleMatched => "rule_matched",
            Reason::NoRuleMatched => "no_rule_matched",
            Reason::DefaultAll => "default_all",
            Reason::DefaultAllAuthenticated => "default_all_authenticated",
            Reason::DefaultDeny => "default_deny",
            Reason::PlaintextNotAllowed => "plaintext_not_allowed",
            Reason::ForeignTrustDomain => "foreign_trust_domain",
            Reason::NoPolicyYet => "no_policy_yet",
        }
    }
}

/// The outcome of evaluating one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the connection goes through.
    pub allowed: bool,
    /// True when an `audit` policy would have refused what was allowed: log and count it.
    pub audit_would_deny: bool,
    /// The policy that decided (`namespace/name`), or `default:<policy>`.
    pub policy: String,
    pub reason: Reason,
}

impl Decision {
    /// `allow`, `deny` or `audit_deny`: the `result` label of the decision metrics.
    pub fn result(&self) -> &'static str {
        match (self.allowed, self.audit_would_deny) {
            (false, _) => "deny",
            (true, true) => "audit_deny",
            (true, false) => "allow",
        }
    }
}

/// Whether `rule` admits `caller` to a workload of `trust_domain`.
pub fn rule_matches(rule: &AllowRule, caller: Caller<'_>, trust_domain: &str) -> bool {
    let id = match caller {
        Caller::Unauthenticated => return matches!(rule, AllowRule::Unauthenticated),
        Caller::Authenticated(id) => id,
    };
    if id.trust_domain() != trust_domain {
        return false;
    }
    match rule {
        AllowRule::Unauthenticated | AllowRule::Authenticated => true,
        AllowRule::Namespaces(list) => list.iter().any(|ns| ns == id.namespace()),
        AllowRule::ServiceAccounts(patterns) => patterns.iter().any(|p| {
            p.namespace == id.namespace()
                && p.service_account
                    .as_deref()
                    .is_none_or(|sa| sa == id.service_account())
        }),
    }
}

/// Whether `policy` applies to `port` (no ports listed: every port).
pub fn covers(policy: &ResolvedPolicy, port: u16) -> bool {
    policy.ports.is_empty() || policy.ports.contains(&port)
}

/// Decides whether `caller` may reach the workload of `inbound` on `port`.
///
/// Enforcing policies that cover the port decide (allow iff one of their rules matches); with
/// none, the default decides. Audit policies never change the outcome: when the connection is
/// allowed but would be refused with the audit policies enforced too, `audit_would_deny` is set.
pub fn evaluate_inbound(inbound: &InboundPolicy, port: u16, caller: Caller<'_>) -> Decision {
    let td = inbound.trust_domain.as_str();
    let covering: Vec<&ResolvedPolicy> = inbound
        .policies
        .iter()
        .filter(|p| covers(p, port))
        .collect();
    let matching = |p: &&&ResolvedPolicy| p.allow.iter().any(|r| rule_matches(r, caller, td));
    let enforcing: Vec<&ResolvedPolicy> = covering
        .iter()
        .copied()
        .filter(|p| p.mode == PolicyMode::Enforce)
        .collect();

    let mut decision = if enforcing.is_empty() {
        decide_default(inbound, caller)
    } else if let Some(p) = enforcing.iter().find(matching) {
        Decision {
            allowed: true,
            audit_would_deny: false,
            policy: p.name.clone(),
            reason: Reason::RuleMatched,
        }
    } else {
        let names: Vec<&str> = enforcing.iter().map(|p| p.name.as_str()).collect();
        Decision {
            allowed: false,
            audit_would_deny: false,
            policy: names.join(","),
            reason: deny_reason(caller, td),
        }
    };

    let auditing: Vec<&ResolvedPolicy> = covering
        .iter()
        .copied()
        .filter(|p| p.mode == PolicyMode::Audit)
        .collect();
    if decision.allowed && !auditing.is_empty() {
        let all = enforcing.iter().chain(auditing.iter());
        if !all
            .clone()
            .any(|p| p.allow.iter().any(|r| rule_matches(r, caller, td)))
        {
            decision.audit_would_deny = true;
            decision.policy = auditing
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(",");
            decision.reason = deny_reason(caller, td);
        }
    }
    decision
}

fn deny_reason(caller: Caller<'_>, trust_domain: &str) -> Reason {
    match caller {
        Caller::Unauthenticated => Reason::PlaintextNotAllowed,
        Caller::Authenticated(id) if id.trust_domain() != trust_domain => {
            Reason::ForeignTrustDomain
        }
        Caller::Authenticated(_) => Reason::NoRuleMatched,
    }
}

fn decide_default(inbound: &InboundPolicy, caller: Caller<'_>) -> Decision {
    let policy = format!("default:{}", inbound.default_policy.as_str());
    let (allowed, reason) = match (inbound.default_policy, caller) {
        (DefaultPolicy::All, _) => (true, Reason::DefaultAll),
        (DefaultPolicy::Deny, _) => (false, Reason::DefaultDeny),
        (DefaultPolicy::AllAuthenticated, Caller::Unauthenticated) => {
            (false, Reason::PlaintextNotAllowed)
        }
        (DefaultPolicy::AllAuthenticated, Caller::Authenticated(id)) => {
            if id.trust_domain() == inbound.trust_domain {
                (true, Reason::DefaultAllAuthenticated)
            } else {
                (false, Reason::ForeignTrustDomain)
            }
        }
    };
    Decision {
        allowed,
        audit_would_deny: false,
        policy,
        reason,
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
