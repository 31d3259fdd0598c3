//! Whether a request gets a patch at all. Namespace opt-in is the webhook configuration's
//! `namespaceSelector` (`palisade.dev/inject=enabled`): an AdmissionReview does not carry the
//! namespace's labels, so every request that reaches `/mutate` is from an opted-in namespace.

use k8s_openapi::api::core::v1::Pod;
use kube_core::GroupVersionKind;
use kube_core::admission::Operation;

use crate::annotations::{INJECT, ValueError, parse_inject};
use crate::sidecar::PROXY_CONTAINER;
use palisade_ca_api::contract::{INJECTED_LABEL, pod_opts_out};

/// Why a request was allowed without a patch; each is counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    NotPod,
    NotCreate,
    Subresource,
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        Self::NotPod,
        Self::NotCreate,
        Self::Subresource,
        Self::OptedOut,
        Self::AlreadyInjected,
        Self::HostNetwork,
    ];

    /// The metrics label and audit annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotPod => "not_pod",
            Self::NotCreate => "not_create",
            Self::Subresource => "subresource",
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
            Self::HostNetwork => "host_network",
        }
    }
}

/// Requests that are not the creation of a Pod pass untouched.
pub fn skip_request(
    kind: &GroupVersionKind,
    operation: &Operation,
    sub_resource: Option<&str>,
) -> Option<SkipReason> {
    if !(kind.group.is_empty() && kind.version == "v1" && kind.kind == "Pod") {
        Some(SkipReason::NotPod)
    } else if sub_resource.is_some_and(|s| !s.is_empty()) {
        Some(SkipReason::Subresource)
    } else if *operation != Operation::Create {
        Some(SkipReason::NotCreate)
    } else {
        None
    }
}

/// Pods that opt out, are injected already, or share the node's network pass untouched.
/// A `palisade.dev/inject` value other than `enabled`/`disabled` is an error: the pod's author
/// meant something, and guessing could leave the pod outside the mesh unnoticed.
pub fn skip_pod(pod: &Pod) -> Result<Option<SkipReason>, ValueError> {
    let meta = &pod.metadata;
    let label = meta.labels.as_ref().and_then(|l| l.get(INJECT));
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(INJECT));
    if pod_opts_out(label.map(String::as_str), annotation.map(String::as_str)) {
        return Ok(Some(SkipReason::OptedOut));
    }
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECTED_LABEL))
        .is_some_and(|v| v == "true");
    let spec = pod.spec.as_ref();
    let has_proxy = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
    });
    if labelled || has_proxy {
        return Ok(Some(SkipReason::AlreadyInjected));
    }
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(Some(SkipReason::HostNetwork));
    }
    if let Some(value) = label {
        parse_inject(&format!("label {INJECT}"), value)?;
    }
    if let Some(value) = annotation {
        parse_inject(&format!("annotation {INJECT}"), value)?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gvk(group: &str, version: &str, kind: &str) -> GroupVersionKind {
        GroupVersionKind::gvk(group, version, kind)
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_pod_creation_is_considered() {
        let pod_kind = gvk("", "v1", "Pod");
        assert_eq!(skip_request(&pod_kind, &Operation::Create, None), None);
        assert_eq!(skip_request(&pod_kind, &Operation::Create, Some("")), None);
        assert_eq!(
            skip_request(&gvk("apps", "v1", "Deployment"), &Operation::Create, None),
            Some(SkipReason::NotPod)
        );
        assert_eq!(
            skip_request(&gvk("", "v1", "Service"), &Operation::Create, None),
            Some(SkipReason::NotPod)
        );
        for op in [Operation::Update, Operation::Delete, Operation::Connect] {
            assert_eq!(
                skip_request(&pod_kind, &op, None),
                Some(SkipReason::NotCreate)
            );
        }
        assert_eq!(
            skip_request(&pod_kind, &Operation::Create, Some("binding")),
            Some(SkipReason::Subresource)
        );
    }

    #[test]
    fn plain_pod_is_injected() {
        let p = pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "app"}]}}));
        assert_eq!(skip_pod(&p).unwrap(), None);
    }

    #[test]
    fn opt_out_by_label_or_annotation() {
        for meta in [
            json!({"labels": {"palisade.dev/inject": "disabled"}}),
            json!({"annotations": {"palisade.dev/inject": "disabled"}}),
            // Disabled wins over a bad value elsewhere: the author asked for no proxy.
            json!({"labels": {"palisade.dev/inject": "disabled"},
                   "annotations": {"palisade.dev/inject": "nope"}}),
        ] {
            let p = pod(json!({"metadata": meta, "spec": {"containers": [{"name": "app"}]}}));
            assert_eq!(skip_pod(&p).unwrap(), Some(SkipReason::OptedOut), "{meta}");
        }
    }

    #[test]
    fn enabled_on_the_pod_changes_nothing() {
        let p = pod(
            json!({"metadata": {"labels": {"palisade.dev/inject": "enabled"}},
                           "spec": {"containers": [{"name": "app"}]}}),
        );
        assert_eq!(skip_pod(&p).unwrap(), None);
    }

    #[test]
    fn already_injected_by_label_or_container() {
        for p in [
            json!({"metadata": {"labels": {"palisade.dev/injected": "true"}},
                   "spec": {"containers": [{"name": "app"}]}}),
            json!({"metadata": {}, "spec": {"containers": [{"name": "palisade-proxy"}]}}),
            json!({"metadata": {}, "spec": {"containers": [{"name": "app"}],
                   "initContainers": [{"name": "palisade-proxy", "restartPolicy": "Always"}]}}),
        ] {
            assert_eq!(
                skip_pod(&pod(p)).unwrap(),
                Some(SkipReason::AlreadyInjected)
            );
        }
    }

    #[test]
    fn injected_label_other_than_true_does_not_skip() {
        let p = pod(
            json!({"metadata": {"labels": {"palisade.dev/injected": "false"}},
                           "spec": {"containers": [{"name": "app"}]}}),
        );
        assert_eq!(skip_pod(&p).unwrap(), None);
    }

    #[test]
    fn host_network_pods_are_skipped() {
        let p = pod(json!({"metadata": {},
                           "spec": {"hostNetwork": true, "containers": [{"name": "app"}]}}));
        assert_eq!(skip_pod(&p).unwrap(), Some(SkipReason::HostNetwork));
    }

    #[test]
    fn unknown_inject_value_is_an_error_naming_label_or_annotation() {
        let p = pod(
            json!({"metadata": {"labels": {"palisade.dev/inject": "false"}},
                           "spec": {"containers": [{"name": "app"}]}}),
        );
        let err = skip_pod(&p).unwrap_err();
        assert_eq!(err.setting, "label palisade.dev/inject");
        let p = pod(
            json!({"metadata": {"annotations": {"palisade.dev/inject": "off"}},
                           "spec": {"containers": [{"name": "app"}]}}),
        );
        let err = skip_pod(&p).unwrap_err();
        assert_eq!(err.setting, "annotation palisade.dev/inject");
    }
}
