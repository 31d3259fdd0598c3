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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::check::test_support::{app_pod, empty, namespace};

    fn shop(pods: Vec<Pod>) -> ClusterSnapshot {
        let mut s = empty();
        s.namespaces.push(namespace(
            "shop",
            json!({"palisade.dev/inject": "enabled"}),
            json!({}),
        ));
        s.namespaces.push(namespace("plain", json!({}), json!({})));
        s.pods = pods;
        s
    }

    fn red(results: &[CheckResult]) -> Vec<(&'static str, String, String)> {
        results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| {
                (
                    r.check,
                    r.message.clone(),
                    r.fix.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn the_fix_restarts_the_controller_that_makes_the_pod() {
        let deployment = app_pod("shop", "web", false);
        assert_eq!(
            recreate(&deployment),
            "kubectl -n shop rollout restart deployment/web"
        );
        let mut set = deployment.clone();
        set.metadata.owner_references.as_mut().unwrap()[0].kind = "StatefulSet".into();
        set.metadata.owner_references.as_mut().unwrap()[0].name = "db".into();
        assert_eq!(
            recreate(&set),
            "kubectl -n shop rollout restart statefulset/db"
        );
        let mut daemon = set.clone();
        daemon.metadata.owner_references.as_mut().unwrap()[0].kind = "DaemonSet".into();
        assert_eq!(
            recreate(&daemon),
            "kubectl -n shop rollout restart daemonset/db"
        );
        let mut bare = deployment;
        bare.metadata.owner_references = None;
        assert!(
            recreate(&bare).starts_with(
                "kubectl -n shop delete pod web-5c7d8f9b6-qw4rt, then create it again"
            )
        );
    }

    #[test]
    fn pods_without_the_proxy_in_opted_in_namespaces_are_named() {
        let mut opted_out = app_pod("shop", "batch", false);
        opted_out
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(INJECT.into(), "disabled".into());
        let mut host = app_pod("shop", "agent", false);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = app_pod("shop", "job", false);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let results = check(&shop(vec![
            app_pod("shop", "api", true),
            app_pod("shop", "web", false),
            app_pod("plain", "other", false),
            opted_out,
            host,
            done,
        ]));
        assert_eq!(
            red(&results),
            [(
                "unmeshed-pod",
                "shop/web-5c7d8f9b6-qw4rt runs without the proxy (namespace shop is opted in; the pod was made before, or while the injector was not called)".to_owned(),
                "kubectl -n shop rollout restart deployment/web".to_owned()
            )]
        );
        assert!(
            results
                .iter()
                .any(|r| r.ok && r.check == "proxies-ready" && r.message == "1 proxies ready")
        );
    }

    #[test]
    fn an_invalid_inject_value_is_the_injectors_error() {
        let mut pod = app_pod("shop", "web", false);
        pod.metadata.annotations = Some([(INJECT.to_owned(), "off".to_owned())].into());
        let found = red(&check(&shop(vec![pod])));
        assert_eq!(found.len(), 1);
        assert!(
            found[0].1.contains("annotation palisade.dev/inject"),
            "{found:?}"
        );
    }

    #[test]
    fn a_proxy_that_is_not_ready_is_named_with_its_reason() {
        let mut pod = app_pod("shop", "api", true);
        let status = &mut pod
            .status
            .as_mut()
            .unwrap()
            .init_container_statuses
            .as_mut()
            .unwrap()[0];
        *status = serde_json::from_value(
            json!({"name": "palisade-proxy", "ready": false, "restartCount": 4,
            "image": "p", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}),
        )
        .unwrap();
        let found = red(&check(&shop(vec![pod])));
        assert_eq!(
            found,
            [(
                "proxies-ready",
                "proxy of shop/api-5c7d8f9b6-qw4rt is not ready: waiting: CrashLoopBackOff; last terminated: Error (exit code 1); 4 restarts".to_owned(),
                "kubectl -n shop logs api-5c7d8f9b6-qw4rt -c palisade-proxy --previous; kubectl -n shop describe pod api-5c7d8f9b6-qw4rt".to_owned()
            )]
        );
    }

    #[test]
    fn a_pod_that_only_claims_to_be_injected_is_named() {
        let mut pod = app_pod("shop", "api", true);
        pod.spec.as_mut().unwrap().init_containers = None;
        let found = red(&check(&shop(vec![pod])));
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .1
                .contains("labelled injected but has no palisade-proxy container")
        );
    }
}
