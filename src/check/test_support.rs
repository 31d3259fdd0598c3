//! Snapshots for the checks' unit tests, built from JSON shaped as the API server sends it.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{Value, json};

use super::snapshot::ClusterSnapshot;

pub const NOW: i64 = 1_800_000_000;

/// A cluster with nothing in it but the namespace of the control plane.
pub fn empty() -> ClusterSnapshot {
    ClusterSnapshot {
        namespace: "palisade-system".into(),
        now: NOW,
        namespaces: vec![namespace("palisade-system", json!({}), json!({}))],
        pods: Vec::new(),
        service_accounts: Ok(Vec::new()),
        policies: Ok(Vec::new()),
        webhook: Ok(None),
        injector_secret: Ok(None),
        crd: Ok(None),
        ca_admin: None,
    }
}

pub fn namespace(name: &str, labels: Value, annotations: Value) -> Namespace {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations}
    }))
    .unwrap()
}

/// A running, ready pod of a Deployment `app`; `proxy` adds the injected sidecar and label.
pub fn app_pod(ns: &str, app: &str, proxy: bool) -> Pod {
    let mut labels = json!({"app": app, "pod-template-hash": "5c7d8f9b6"});
    let mut init = json!([]);
    let mut init_status = json!([]);
    if proxy {
        labels["palisade.dev/injected"] = json!("true");
        init = json!([{"name": "palisade-proxy", "restartPolicy": "Always"}]);
        init_status = json!([{"name": "palisade-proxy", "ready": true, "restartCount": 0,
            "image": "p", "imageID": "", "state": {"running": {}}}]);
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("{app}-5c7d8f9b6-qw4rt"), "namespace": ns, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5c7d8f9b6"),
                "uid": "u", "controller": true}]},
        "spec": {"serviceAccountName": app, "containers": [{"name": app}], "initContainers": init},
        "status": {"phase": "Running", "podIP": "10.0.0.5",
            "conditions": [{"type": "Ready", "status": "True"}],
            "initContainerStatuses": init_status,
            "containerStatuses": [{"name": app, "ready": true, "restartCount": 0, "image": "a", "imageID": "", "state": {"running": {}}}]}
    }))
    .unwrap()
}
