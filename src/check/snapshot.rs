//! What `palisade check` looks at: the cluster's objects as the API server listed them, and what
//! the CA's admin port answered. Plain data, so every check is a pure function of it.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use palisade_ca::kube::crd::MeshPolicy;

/// One object fetched by name: `Ok(None)` when the API server answered 404, `Err` with what
/// went wrong (and, for 403, the permission to grant) otherwise.
pub type Fetched<T> = Result<Option<T>, String>;

/// The cluster as one run of `palisade check` saw it.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// The control plane's namespace (`--namespace`).
    pub namespace: String,
    /// Unix seconds when the snapshot was taken.
    pub now: i64,
    pub namespaces: Vec<Namespace>,
    /// Every pod of the cluster.
    pub pods: Vec<Pod>,
    /// Pods, namespaces and service accounts that did not decode (each is left out above).
    pub undecoded: Vec<Undecoded>,
    /// Every service account of the cluster, or why they could not be listed.
    pub service_accounts: Result<Vec<ServiceAccount>, String>,
    /// Every MeshPolicy, each as it decoded. The list itself fails when the CRD is missing
    /// (404) or access is denied.
    pub policies: Result<Vec<ListedPolicy>, ListError>,
    /// The MutatingWebhookConfiguration the chart installs.
    pub webhook: Fetched<MutatingWebhookConfiguration>,
    /// The Secret the chart mounts into the injector (its serving certificate).
    pub injector_secret: Fetched<Secret>,
    pub crd: Fetched<CustomResourceDefinition>,
    /// What a ready CA pod's admin port answered; `None` when no CA pod was ready to ask.
    pub ca_admin: Option<CaAdmin>,
}

/// A MeshPolicy as listed: decoded, or why it could not be.
pub type ListedPolicy = Result<MeshPolicy, Undecoded>;

pub use crate::kube_list::Undecoded;

/// Why a list failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    /// 404: the kind is not served (for MeshPolicies: the CRD is missing).
    NotServed,
    Other(String),
}

/// The answers of one CA pod's admin port (15014), through the API server's pod proxy.
#[derive(Debug, Clone)]
pub struct CaAdmin {
    /// `namespace/name` of the pod asked.
    pub pod: String,
    /// The body of `GET /rotation`, or why there was none.
    pub rotation: Result<String, String>,
    /// The body of `GET /metrics` (Prometheus text), or why there was none.
    pub metrics: Result<String, String>,
}

/// The pod's phase is Succeeded or Failed: it runs nothing any more.
pub fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a container is not ready, from its status: the waiting or terminated reason now, else
/// the last termination's.
pub fn container_problem(status: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
    let state = status.state.as_ref();
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref());
    let mut why = if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        format!(
            "waiting: {}",
            w.reason.as_deref().unwrap_or("no reason given")
        )
    } else if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        format!(
            "terminated: {} (exit code {})",
            t.reason.as_deref().unwrap_or("no reason given"),
            t.exit_code
        )
    } else if state.is_some_and(|s| s.running.is_some()) {
        "running, its readiness probe failing".to_owned()
    } else {
        "not started".to_owned()
    };
    if let Some(t) = last {
        why.push_str(&format!(
            "; last terminated: {} (exit code {})",
            t.reason.as_deref().unwrap_or("no reason given"),
            t.exit_code
        ));
    }
    if status.restart_count > 0 {
        why.push_str(&format!("; {} restarts", status.restart_count));
    }
    why
}

/// Why a pod is not ready: its first container that is not, or its phase.
pub fn pod_problem(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let containers = status.into_iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    for c in containers {
        // An init container that ran to completion is not ready, and need not be.
        let completed = c
            .state
            .as_ref()
            .is_some_and(|s| s.terminated.as_ref().is_some_and(|t| t.exit_code == 0));
        if !c.ready && !completed {
            return format!("container {} {}", c.name, container_problem(c));
        }
    }
    format!(
        "phase {}",
        status.and_then(|s| s.phase.as_deref()).unwrap_or("unknown")
    )
}

/// Unix seconds as an RFC 3339 time, as every time in the output is written.
pub fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix seconds)"))
}
