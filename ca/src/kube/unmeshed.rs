//! Pods that run without the proxy in a namespace that opted in: created before the opt-in, or
//! while the injector was down. Every 60 s, and whenever the opted-in set changes, the CA lists
//! the pods of each opted-in namespace that lack the `palisade.dev/injected` label — never every
//! pod of the cluster — and sorts them: unmeshed (a Warning Event `Unmeshed` on the pod, once,
//! saying how to fix it; `palisade_unmeshed_pods`), or outside the mesh on purpose
//! (`palisade_opted_out_pods{reason}`: opted out, or host network, which the injector skips).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use kube::api::{Api, ListParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use palisade_ca_api::contract::{INJECT, INJECTED_LABEL, PROXY_CONTAINER, pod_opts_out};
use tokio::sync::watch;

use crate::metrics::{Metrics, PodCounts};

/// How often every opted-in namespace is listed again.
pub const SCAN_EVERY: Duration = Duration::from_secs(60);
/// The Event's reason, as `kubectl get events --field-selector reason=Unmeshed` finds it.
pub const EVENT_REASON: &str = "Unmeshed";
/// The Event's action: what the CA did when it noticed.
pub const EVENT_ACTION: &str = "CheckMesh";
/// Pods listed per request.
const PAGE: u32 = 500;

/// Why a listed pod is outside the mesh; pods that need no word (finished, being deleted,
/// carrying the proxy) have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmeshed {
    /// Should have the proxy and does not.
    Missing,
    /// Opted out on purpose (label or annotation `palisade.dev/inject=disabled`).
    OptedOut,
    /// Shares the node's network: the injector skips such pods by design.
    HostNetwork,
}

/// Whether the proxy is among the pod's containers (a native sidecar init container, or a
/// plain container on older clusters).
pub fn has_proxy_container(spec: &PodSpec) -> bool {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER)
}

/// Sorts one pod of an opted-in namespace, in the injector's order: an opt-out wins, then
/// host network. `None` for pods that are finished or being deleted (a restart would not
/// help them) and for pods that are injected after all.
pub fn classify(pod: &Pod) -> Option<Unmeshed> {
    if pod.metadata.deletion_timestamp.is_some()
        || pod.labels().contains_key(INJECTED_LABEL)
        || matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    {
        return None;
    }
    let spec = pod.spec.as_ref();
    if spec.is_some_and(has_proxy_container) {
        return None;
    }
    let label = pod.labels().get(INJECT).map(String::as_str);
    let annotation = pod.annotations().get(INJECT).map(String::as_str);
    if pod_opts_out(label, annotation) {
        Some(Unmeshed::OptedOut)
    } else if spec.and_then(|s| s.host_network) == Some(true) {
        Some(Unmeshed::HostNetwork)
    } else {
        Some(Unmeshed::Missing)
    }
}

/// What brings the pod back with the proxy: a restart of whatever owns it.
pub fn fix_for(pod: &Pod) -> String {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let owners = pod.owner_references();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first());
    let restart = |kind: &str, owner: &str| {
        format!("Restart its owner: kubectl -n {namespace} rollout restart {kind}/{owner}")
    };
    match owner {
        None => format!(
            "It has no owner to recreate it: delete it (kubectl -n {namespace} delete pod {name}) and create it again"
        ),
        Some(o) if o.kind == "ReplicaSet" => match deployment_of(&o.name, pod) {
            Some(deployment) => restart("deployment", deployment),
            None => format!(
                "Delete the pod so ReplicaSet {} recreates it: kubectl -n {namespace} delete pod {name}",
                o.name
            ),
        },
        Some(o) if o.kind == "StatefulSet" => restart("statefulset", &o.name),
        Some(o) if o.kind == "DaemonSet" => restart("daemonset", &o.name),
        Some(o) if o.kind == "Job" => format!(
            "Job {} creates its next pods with the proxy; to mesh this one now, delete it: kubectl -n {namespace} delete pod {name}",
            o.name
        ),
        Some(o) => format!(
            "Recreate it through its owner {}/{}, or delete it: kubectl -n {namespace} delete pod {name}",
            o.kind, o.name
        ),
    }
}

/// The Deployment behind a ReplicaSet named `<deployment>-<pod-template-hash>`: a Deployment
/// labels its pods with that hash, so a ReplicaSet made by hand (no label, or another suffix)
/// is never taken for one.
fn deployment_of<'a>(replica_set: &'a str, pod: &Pod) -> Option<&'a str> {
    let (deployment, hash) = replica_set.rsplit_once('-')?;
    let labelled = pod.labels().get("pod-template-hash").map(String::as_str);
    (!deployment.is_empty() && labelled == Some(hash)).then_some(deployment)
}

/// The Event's note: what is wrong, why it happens, and the fix.
pub fn note_for(pod: &Pod) -> String {
    let namespace = pod.namespace().unwrap_or_default();
    format!(
        "pod runs without the Palisade proxy in namespace {namespace}, which is opted in \
         ({INJECT}=enabled): it was created before the opt-in or while the injector was \
         unavailable. {}",
        fix_for(pod)
    )
}

/// The background scan: counts per namespace, and the pods already reported.
struct Scan {
    client: kube::Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// UIDs of unmeshed pods with an Event, by namespace; a pod no longer listed is forgotten.
    reported: BTreeMap<String, BTreeSet<String>>,
}

impl Scan {
    async fn all(&mut self, namespaces: &BTreeSet<String>) {
        self.reported.retain(|ns, _| namespaces.contains(ns));
        self.metrics.keep_pod_counts_of(namespaces);
        for namespace in namespaces {
            self.namespace(namespace).await;
        }
    }

    async fn namespace(&mut self, namespace: &str) {
        let pods = match list_uninjected(&self.client, namespace).await {
            Ok(pods) => pods,
            Err(error) => {
                self.metrics.unmeshed_scan_error("list_pods");
                tracing::warn!(
                    namespace,
                    %error,
                    "cannot list pods to find unmeshed ones; keeping the last counts and retrying in 60 s (does the CA's ClusterRole allow pods list?)"
                );
                return;
            }
        };
        let mut counts = PodCounts::default();
        let mut missing = Vec::new();
        for pod in pods {
            match classify(&pod) {
                Some(Unmeshed::Missing) => {
                    counts.unmeshed += 1;
                    missing.push(pod);
                }
                Some(Unmeshed::OptedOut) => counts.opted_out += 1,
                Some(Unmeshed::HostNetwork) => counts.host_network += 1,
                None => {}
            }
        }
        self.metrics.set_pod_counts(namespace, counts);
        let listed: BTreeSet<String> = missing.iter().filter_map(|p| p.uid()).collect();
        let reported = self.reported.entry(namespace.to_owned()).or_default();
        reported.retain(|uid| listed.contains(uid));
        for pod in &missing {
            // Without a uid or name there is nothing to attach an Event to, or to remember.
            let (Some(uid), Some(_)) = (pod.uid(), pod.metadata.name.as_ref()) else {
                continue;
            };
            if reported.contains(&uid) {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: EVENT_REASON.into(),
                note: Some(note_for(pod)),
                action: EVENT_ACTION.into(),
                secondary: None,
            };
            match self.recorder.publish(&event, &pod.object_ref(&())).await {
                Ok(()) => {
                    tracing::info!(
                        namespace,
                        pod = pod.name_any(),
                        "pod runs without the proxy: Event Unmeshed posted"
                    );
                    reported.insert(uid);
                }
                Err(error) => {
                    self.metrics.unmeshed_scan_error("create_event");
                    tracing::warn!(
                        namespace,
                        pod = pod.name_any(),
                        %error,
                        "cannot post the Unmeshed Event; retrying at the next scan (does the CA's ClusterRole allow events.k8s.io events create and patch?)"
                    );
                }
            }
        }
    }
}

/// The namespace's pods without the injected label, page by page.
async fn list_uninjected(client: &kube::Client, namespace: &str) -> Result<Vec<Pod>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut params = ListParams::default()
        .labels(&format!("!{INJECTED_LABEL}"))
        .limit(PAGE);
    let mut pods = Vec::new();
    loop {
        let page = api.list(&params).await?;
        pods.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pods),
        }
    }
}

/// Reports unmeshed pods in every opted-in namespace except `never_injected` (namespaces the
/// webhook leaves out whatever their label says: `kube-system` and the control plane's own),
/// until shutdown.
pub async fn report_unmeshed(
    client: kube::Client,
    metrics: Arc<Metrics>,
    never_injected: BTreeSet<String>,
    mut opted_in: watch::Receiver<BTreeSet<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let reporter = Reporter {
        controller: crate::kube::anchors::MANAGED_BY.into(),
        instance: None,
    };
    let mut scan = Scan {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics,
        reported: BTreeMap::new(),
    };
    let mut every = tokio::time::interval(SCAN_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        let namespaces: BTreeSet<String> = opted_in
            .borrow_and_update()
            .difference(&never_injected)
            .cloned()
            .collect();
        // A slow API server must not hold up shutdown: a scan cut short changes nothing kept.
        tokio::select! {
            () = scan.all(&namespaces) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            changed = opted_in.changed() => if changed.is_err() { return },
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
#[path = "unmeshed_tests.rs"]
mod tests;
