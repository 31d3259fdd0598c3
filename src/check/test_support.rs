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
        undecoded: Vec::new(),
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

/// Base64, as the API server writes `caBundle` and Secret data.
pub fn b64(data: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The chart's MutatingWebhookConfiguration with `ca_pem` as its caBundle.
pub fn webhook(ca_pem: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "palisade-injector"},
        "webhooks": [{
            "name": "sidecar-injector.palisade.dev",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "palisade-injector", "namespace": "palisade-system", "path": "/mutate", "port": 443},
                             "caBundle": b64(ca_pem)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "palisade.dev/inject", "operator": "In", "values": ["enabled"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "palisade-system"]}]},
            "objectSelector": {"matchExpressions": [{"key": "palisade.dev/inject", "operator": "NotIn", "values": ["disabled"]}]},
            "failurePolicy": "Fail", "matchPolicy": "Equivalent", "sideEffects": "None", "timeoutSeconds": 10,
            "reinvocationPolicy": "IfNeeded"
        }]
    })
}

/// The Secret the chart mounts into the injector.
pub fn injector_secret(cert_pem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "palisade-injector-tls", "namespace": "palisade-system"},
        "data": {"tls.crt": b64(cert_pem), "tls.key": b64("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")}
    })
}
