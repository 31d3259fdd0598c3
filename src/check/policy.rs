//! MeshPolicies and namespace default policies, judged with the CA's own conversions
//! (`usable_policy`, `workload_of`, `default_policy_of`) and the evaluator's own rule matching
//! (`rule_matches`): no second interpretation of policy.
//!
//! A policy is *shadowed* by another when removing it would change no decision: both are in
//! the same namespace, the other selects every meshed pod it selects and covers every port it
//! covers, admits every caller it admits, and is `enforce` (or both are `audit`). Policies
//! combine by "allow iff any rule of the covering policies matches", so the shadowed one adds
//! nothing. Identical policies shadow each other; the later name is reported.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use palisade_ca::kube::state::{default_policy_of, usable_policy, workload_of};
use palisade_ca::mesh::Workload;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::contract::{DEFAULT_POLICY_ANNOTATION, DEFAULT_TRUST_DOMAIN};
use palisade_ca_api::policy::{
    AllowRule, Caller, DefaultPolicy, NamedPolicy, PolicyMode, rule_matches,
};

use super::CheckResult;
use super::snapshot::{ClusterSnapshot, ListError, finished};

pub fn check(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let mut out = default_policies(s);
    let listed = match &s.policies {
        // The CRD check says why and what to do.
        Err(ListError::NotServed) => return out,
        Err(ListError::Other(e)) => {
            out.push(CheckResult::fail(
                "policies",
                e.clone(),
                "grant the read access, then run again",
            ));
            return out;
        }
        Ok(listed) => listed,
    };
    let mut usable = Vec::new();
    for entry in listed {
        let problem = match entry {
            Err(undecoded) => (undecoded.name.clone(), undecoded.error.clone()),
            Ok(mp) => match usable_policy(mp) {
                Ok(named) => {
                    usable.push(named);
                    continue;
                }
                Err(e) => (
                    format!("{}/{}", mp.namespace().unwrap_or_default(), mp.name_any()),
                    e,
                ),
            },
        };
        let (name, why) = problem;
        let (ns, short) = name.split_once('/').unwrap_or(("", &name));
        out.push(CheckResult::fail(
            "policy-malformed",
            format!("MeshPolicy {name} is ignored by the CA: {why}"),
            format!(
                "kubectl -n {ns} edit meshpolicy {short} (see docs/kubernetes-mode.md for the spec)"
            ),
        ));
    }
    usable.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let workloads: Vec<Workload> = s.pods.iter().filter_map(workload_of).collect();
    let before = out.len();
    out.extend(selects_nothing(&usable, &workloads, &s.pods));
    out.extend(unknown_references(&usable, s));
    out.extend(shadowed(&usable, &workloads));
    if out.len() == before {
        out.push(CheckResult::pass(
            "policies",
            format!(
                "{} MeshPolicies: each selects a meshed pod, names only existing namespaces and service accounts, and none is shadowed",
                usable.len()
            ),
        ));
    }
    out
}

fn default_policies(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for ns in &s.namespaces {
        if let Err(e) = default_policy_of(ns) {
            let name = ns.name_any();
            out.push(CheckResult::fail(
                "namespace-default-policy",
                format!("namespace {name}: annotation {DEFAULT_POLICY_ANNOTATION}: {e}; the CA ignores it and applies the mesh default"),
                format!(
                    "kubectl annotate namespace {name} --overwrite {DEFAULT_POLICY_ANNOTATION}=VALUE, VALUE one of {}",
                    DefaultPolicy::ACCEPTED
                ),
            ));
        }
    }
    if out.is_empty() {
        out.push(CheckResult::pass(
            "namespace-default-policy",
            format!("every {DEFAULT_POLICY_ANNOTATION} annotation is valid"),
        ));
    }
    out
}

fn selected<'a>(p: &NamedPolicy, workloads: &'a [Workload]) -> Vec<&'a Workload> {
    workloads
        .iter()
        .filter(|w| w.namespace == p.namespace && p.spec.target_selector.selects(&w.labels))
        .collect()
}

fn selects_nothing(
    policies: &[NamedPolicy],
    workloads: &[Workload],
    pods: &[Pod],
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for p in policies {
        if !selected(p, workloads).is_empty() {
            continue;
        }
        let unmeshed = pods
            .iter()
            .filter(|pod| {
                pod.namespace().as_deref() == Some(p.namespace.as_str()) && !finished(pod)
            })
            .filter(|pod| p.spec.target_selector.selects(pod.labels()))
            .count();
        let note = if unmeshed > 0 {
            format!(
                " ({unmeshed} pods match its selector but run without the proxy: see unmeshed-pod)"
            )
        } else {
            String::new()
        };
        out.push(CheckResult::fail(
            "policy-selects-nothing",
            format!("MeshPolicy {}/{} selects no meshed pod{note}", p.namespace, p.name),
            format!(
                "compare its targetSelector with the pods' labels: kubectl -n {} get pods --show-labels; delete the policy if its workload is gone",
                p.namespace
            ),
        ));
    }
    out
}

fn unknown_references(policies: &[NamedPolicy], s: &ClusterSnapshot) -> Vec<CheckResult> {
    let namespaces: BTreeSet<String> = s.namespaces.iter().map(|n| n.name_any()).collect();
    let mut out = Vec::new();
    let accounts: Option<BTreeSet<(String, String)>> = match &s.service_accounts {
        Ok(list) => Some(
            list.iter()
                .map(|a| (a.namespace().unwrap_or_default(), a.name_any()))
                .collect(),
        ),
        Err(e) => {
            out.push(CheckResult::fail(
                "policy-unknown-reference",
                format!("cannot tell whether the service accounts MeshPolicies name exist: {e}"),
                "grant the read access, then run again",
            ));
            None
        }
    };
    for p in policies {
        let mut missing = Vec::new();
        for rule in &p.spec.allow {
            match rule {
                AllowRule::Namespaces(list) => missing.extend(
                    list.iter()
                        .filter(|ns| !namespaces.contains(*ns))
                        .map(|ns| format!("namespace {ns}")),
                ),
                AllowRule::ServiceAccounts(patterns) => {
                    for pattern in patterns {
                        if !namespaces.contains(&pattern.namespace) {
                            missing.push(format!("namespace {} (in {pattern})", pattern.namespace));
                        } else if let (Some(sa), Some(accounts)) =
                            (&pattern.service_account, &accounts)
                            && !accounts.contains(&(pattern.namespace.clone(), sa.clone()))
                        {
                            missing.push(format!("service account {pattern}"));
                        }
                    }
                }
                AllowRule::Authenticated | AllowRule::Unauthenticated => {}
            }
        }
        if !missing.is_empty() {
            out.push(CheckResult::fail(
                "policy-unknown-reference",
                format!(
                    "MeshPolicy {}/{} allows {} that does not exist: its rule admits nobody until it does",
                    p.namespace,
                    p.name,
                    missing.join(", ")
                ),
                format!("fix the name (a typo?) or create it: kubectl -n {} edit meshpolicy {}", p.namespace, p.name),
            ));
        }
    }
    out
}

/// A name no rule of `rules` mentions as a namespace or service account.
fn unlisted(rules: &[AllowRule]) -> String {
    let mentioned: BTreeSet<&str> = rules
        .iter()
        .flat_map(|r| -> Vec<&str> {
            match r {
                AllowRule::Namespaces(list) => list.iter().map(String::as_str).collect(),
                AllowRule::ServiceAccounts(p) => p
                    .iter()
                    .flat_map(|p| [Some(p.namespace.as_str()), p.service_account.as_deref()])
                    .flatten()
                    .collect(),
                _ => Vec::new(),
            }
        })
        .collect();
    (0..)
        .map(|i| format!("palisade-check-unlisted-{i}"))
        .find(|n| !mentioned.contains(n.as_str()))
        .expect("finitely many names are mentioned")
}

/// Whether every caller `rule` admits is admitted by one of `others`. Each form of rule is
/// stood for by callers that only the rules naming them (or admitting everyone) admit: a
/// namespace or service account no rule of `others` mentions.
fn rule_covered(rule: &AllowRule, others: &[AllowRule]) -> bool {
    let td = DEFAULT_TRUST_DOMAIN;
    let fresh = unlisted(others);
    let id = |ns: &str, sa: &str| SpiffeId::new(td, ns, sa).ok();
    let ids: Option<Vec<SpiffeId>> = match rule {
        AllowRule::Unauthenticated | AllowRule::Authenticated => vec![id(&fresh, &fresh)],
        AllowRule::Namespaces(list) => list.iter().map(|ns| id(ns, &fresh)).collect(),
        AllowRule::ServiceAccounts(patterns) => patterns
            .iter()
            .map(|p| id(&p.namespace, p.service_account.as_deref().unwrap_or(&fresh)))
            .collect(),
    }
    .into_iter()
    .collect();
    // A name that makes no valid identity: nothing to compare, so not covered.
    let Some(ids) = ids else { return false };
    let admitted = |caller: Caller<'_>| others.iter().any(|o| rule_matches(o, caller, td));
    ids.iter().all(|id| admitted(Caller::Authenticated(id)))
        && (!matches!(rule, AllowRule::Unauthenticated) || admitted(Caller::Unauthenticated))
}

fn ports_covered(inner: &[u16], outer: &[u16]) -> bool {
    outer.is_empty() || (!inner.is_empty() && inner.iter().all(|p| outer.contains(p)))
}

/// Whether `a` adds nothing next to `b` (see the module's documentation).
fn shadows(b: &NamedPolicy, a: &NamedPolicy, workloads: &[Workload]) -> bool {
    let a_pods = selected(a, workloads);
    a.namespace == b.namespace
        && !a_pods.is_empty()
        && (b.spec.mode == PolicyMode::Enforce || a.spec.mode == PolicyMode::Audit)
        && a_pods
            .iter()
            .all(|w| b.spec.target_selector.selects(&w.labels))
        && ports_covered(&a.spec.ports, &b.spec.ports)
        && a.spec.allow.iter().all(|r| rule_covered(r, &b.spec.allow))
}

fn shadowed(policies: &[NamedPolicy], workloads: &[Workload]) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (i, a) in policies.iter().enumerate() {
        // Of two that shadow each other, only the later is reported.
        let by = policies.iter().enumerate().find(|(j, b)| {
            *j != i && shadows(b, a, workloads) && (*j < i || !shadows(a, b, workloads))
        });
        if let Some((_, b)) = by {
            out.push(CheckResult::fail(
                "policy-shadowed",
                format!(
                    "MeshPolicy {}/{} is shadowed by {}: {} selects every pod and port it does and admits every caller it admits, so it changes no decision",
                    a.namespace, a.name, b.name, b.name
                ),
                format!(
                    "delete one, or merge them: kubectl -n {} delete meshpolicy {} (if that was the intent, narrow {} instead)",
                    a.namespace, a.name, b.name
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
