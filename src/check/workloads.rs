//! Pods of opted-in namespaces: each should run the proxy, and its proxy should be ready.
//! Which pods the injector leaves alone is decided by the injector's own `skip_pod`.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use palisade_ca_api::contract::{INJECT, PROXY_CONTAINER};
use palisade_injector::decision::{SkipReason, skip_pod};

use super::CheckResult;
use super::snapshot::{ClusterSnapshot, container_problem, finished};

/// The command that makes a pod again, so that the injector sees it: from its controller.
pub fn recreate(pod: &Pod) -> String {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    match owner.map(|o| (o.kind.as_str(), o.name.as_str())) {
        Some(("ReplicaSet", rs)) => {
            let deployment = pod
                .labels()
                .get("pod-template-hash")
                .and_then(|hash| rs.strip_suffix(&format!("-{hash}")))
                .or_else(|| rs.rsplit_once('-').map(|(d, _)| d))
                .unwrap_or(rs);
            format!("kubectl -n {ns} rollout restart deployment/{deployment}")
        }
        Some(("StatefulSet", set)) => format!("kubectl -n {ns} rollout restart statefulset/{set}"),
        Some(("DaemonSet", set)) => format!("kubectl -n {ns} rollout restart daemonset/{set}"),
        Some((kind, owner)) => {
            format!("kubectl -n {ns} delete pod {name} (its {kind} {owner} makes it again)")
        }
        None => format!(
            "kubectl -n {ns} delete pod {name}, then create it again from its manifest (no controller makes it again)"
        ),
    }
}

pub fn check(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let opted_in: Vec<String> = s
        .namespaces
        .iter()
        .filter(|n| n.labels().get(INJECT).map(String::as_str) == Some("enabled"))
        .map(|n| n.name_any())
        .collect();
    if opted_in.is_empty() {
        return vec![CheckResult::pass(
            "unmeshed-pods",
            format!("no namespace is labelled {INJECT}=enabled"),
        )];
    }
    let mut out = Vec::new();
    let (mut meshed, mut ready) = (0usize, 0usize);
    for pod in &s.pods {
        let ns = pod.namespace().unwrap_or_default();
        if !opted_in.contains(&ns) || finished(pod) {
            continue;
        }
        let name = format!("{ns}/{}", pod.name_any());
        match skip_pod(pod) {
            Ok(None) => out.push(CheckResult::fail(
                "unmeshed-pod",
                format!("{name} runs without the proxy (namespace {ns} is opted in; the pod was made before, or while the injector was not called)"),
                recreate(pod),
            )),
            Err(e) => out.push(CheckResult::fail(
                "unmeshed-pod",
                format!("{name} runs without the proxy: {e}"),
                format!("set the pod template's {INJECT} to enabled or disabled, then {}", recreate(pod)),
            )),
            Ok(Some(SkipReason::AlreadyInjected)) => {
                meshed += 1;
                match proxy(pod) {
                    Ok(()) => ready += 1,
                    Err(problem) => out.push(problem),
                }
            }
            // Opted out, or hostNetwork: left alone on purpose.
            Ok(Some(_)) => {}
        }
    }
    let unmeshed = out.iter().filter(|r| r.check == "unmeshed-pod").count();
    if unmeshed == 0 {
        out.insert(
            0,
            CheckResult::pass(
                "unmeshed-pods",
                format!(
                    "every pod of the opted-in namespaces ({}) runs the proxy, or opted out",
                    opted_in.join(", ")
                ),
            ),
        );
    }
    if meshed > 0 && ready == meshed {
        out.push(CheckResult::pass(
            "proxies-ready",
            format!("{ready} proxies ready"),
        ));
    }
    out
}

/// The proxy container of an injected pod is there and ready.
fn proxy(pod: &Pod) -> Result<(), CheckResult> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let in_spec = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
    });
    if !in_spec {
        return Err(CheckResult::fail(
            "proxies-ready",
            format!(
                "{ns}/{name} is labelled injected but has no {PROXY_CONTAINER} container: the CA does not treat it as meshed"
            ),
            recreate(pod),
        ));
    }
    let status = pod.status.as_ref().and_then(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
            .find(|c| c.name == PROXY_CONTAINER)
    });
    let why = match status {
        Some(c) if c.ready => return Ok(()),
        Some(c) => container_problem(c),
        None => format!(
            "not started (pod phase {})",
            pod.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .unwrap_or("unknown")
        ),
    };
    let previous = if status.is_some_and(|c| {
        c.last_state
            .as_ref()
            .is_some_and(|l| l.terminated.is_some())
    }) {
        " --previous"
    } else {
        ""
    };
    Err(CheckResult::fail(
        "proxies-ready",
        format!("proxy of {ns}/{name} is not ready: {why}"),
        format!(
            "kubectl -n {ns} logs {name} -c {PROXY_CONTAINER}{previous}; kubectl -n {ns} describe pod {name}"
        ),
    ))
}
