//! Pure conversions from Kubernetes objects to control-plane state, and [`Tracked`]: one watched
//! kind's objects, kept from watcher events so that a relist swaps in the new list only once it
//! is complete and an error never empties it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use palisade_ca_api::policy::{DefaultPolicy, NamedPolicy};

use super::crd::MeshPolicy;
use super::services::{ServiceInfo, SliceInfo, services_with_endpoints};
use crate::mesh::{MeshState, Workload};

pub use palisade_ca_api::contract::{
    DEFAULT_POLICY_ANNOTATION, INJECT as INJECT_LABEL, INJECTED_LABEL, PROXY_CONTAINER,
};

/// The objects of one kind, by `(namespace, name)`, as converted values.
#[derive(Debug)]
pub struct Tracked<V> {
    items: BTreeMap<(String, String), V>,
    relisting: Option<BTreeMap<(String, String), V>>,
    synced: bool,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked {
            items: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

fn key_of<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl<V> Tracked<V> {
    /// Applies one watcher event; true when the visible objects may have changed.
    pub fn apply<K: ResourceExt>(
        &mut self,
        event: Event<K>,
        convert: impl Fn(&K) -> Option<V>,
    ) -> bool {
        match event {
            Event::Apply(obj) => {
                let key = key_of(&obj);
                match convert(&obj) {
                    Some(v) => self.items.insert(key, v),
                    None => self.items.remove(&key),
                };
                true
            }
            Event::Delete(obj) => {
                self.items.remove(&key_of(&obj));
                true
            }
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                let value = convert(&obj);
                if let (Some(list), Some(v)) = (self.relisting.as_mut(), value) {
                    list.insert(key_of(&obj), v);
                }
                false
            }
            Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.items = list;
                }
                self.synced = true;
                true
            }
        }
    }

    /// Whether a complete list has been seen at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.items.values()
    }
}

/// A meshed pod as a workload; `None` for pods that are gone (their IPs may be reused), and
/// for pods that only claim to be meshed: the label alone is something any pod can set, so a
/// pod counts only with the injected proxy container, and never a hostNetwork pod (its
/// address is the node's, shared with everything on the node).
pub fn workload_of(pod: &Pod) -> Option<Workload> {
    if pod.labels().get(INJECTED_LABEL).map(String::as_str) != Some("true") {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    if !super::unmeshed::has_proxy_container(spec) {
        tracing::debug!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
            "labelled injected without the proxy container: not meshed");
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|list| list.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    Some(Workload {
        name: pod.name_any(),
        namespace: pod.namespace()?,
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        ips,
        labels: pod.labels().clone(),
    })
}

/// What the control plane reads from a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub default_policy: Option<DefaultPolicy>,
    /// Labelled `palisade.dev/inject=enabled`: gets the trust-anchor ConfigMap.
    pub opted_in: bool,
}

/// The namespace's `palisade.dev/default-policy` annotation: `Ok(None)` without one, `Err`
/// naming the bad value when it is not a default policy (the CA then applies the mesh default).
pub fn default_policy_of(ns: &Namespace) -> Result<Option<DefaultPolicy>, String> {
    ns.annotations()
        .get(DEFAULT_POLICY_ANNOTATION)
        .map(|text| text.parse())
        .transpose()
}

pub fn namespace_info(ns: &Namespace) -> Option<NamespaceInfo> {
    let name = ns.name_any();
    let default_policy = default_policy_of(ns).unwrap_or_else(|error| {
        tracing::warn!(namespace = %name, annotation = DEFAULT_POLICY_ANNOTATION, %error, "ignoring the annotation; the mesh default applies");
        None
    });
    Some(NamespaceInfo {
        opted_in: ns.labels().get(INJECT_LABEL).map(String::as_str) == Some("enabled"),
        name,
        default_policy,
    })
}

/// A MeshPolicy the control plane can use; the same checks as the file source.
pub fn policy_of(policy: &MeshPolicy) -> Option<NamedPolicy> {
    match usable_policy(policy) {
        Ok(named) => Some(named),
        Err(problem) => {
            tracing::warn!(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any()), %problem, "ignoring MeshPolicy");
            None
        }
    }
}

/// The MeshPolicy as the control plane uses it, or why the control plane ignores it.
pub fn usable_policy(policy: &MeshPolicy) -> Result<NamedPolicy, String> {
    let named = policy
        .to_named()
        .ok_or_else(|| "it has no name or namespace".to_owned())?;
    named.spec.target_selector.validate()?;
    if named.spec.ports.contains(&0) {
        return Err("port 0 is not a port".to_owned());
    }
    Ok(named)
}

/// Everything the watches hold, as one state.
#[derive(Debug, Default)]
pub struct ClusterObjects {
    pub pods: Tracked<Workload>,
    pub namespaces: Tracked<NamespaceInfo>,
    pub policies: Tracked<NamedPolicy>,
    pub services: Tracked<ServiceInfo>,
    pub endpoint_slices: Tracked<SliceInfo>,
}

impl ClusterObjects {
    pub fn synced(&self) -> bool {
        self.pods.synced()
            && self.namespaces.synced()
            && self.policies.synced()
            && self.services.synced()
            && self.endpoint_slices.synced()
    }

    pub fn mesh_state(&self, trust_domain: &str, default_policy: DefaultPolicy) -> MeshState {
        let namespace_defaults: HashMap<String, DefaultPolicy> = self
            .namespaces
            .values()
            .filter_map(|n| n.default_policy.map(|p| (n.name.clone(), p)))
            .collect();
        MeshState::new(
            trust_domain.to_owned(),
            default_policy,
            namespace_defaults,
            self.pods.values().cloned().collect(),
            self.policies.values().cloned().collect(),
            services_with_endpoints(self.services.values(), self.endpoint_slices.values()),
        )
    }

    pub fn opted_in(&self) -> BTreeSet<String> {
        self.namespaces
            .values()
            .filter(|n| n.opted_in)
            .map(|n| n.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pods_become_workloads() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web", "palisade.dev/injected": "true"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "web"}],
                     "initContainers": [{"name": "palisade-proxy", "restartPolicy": "Always"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }));
        let w = workload_of(&p).unwrap();
        assert_eq!(
            (
                w.name.as_str(),
                w.namespace.as_str(),
                w.service_account.as_str()
            ),
            ("web-1", "shop", "web")
        );
        assert_eq!(w.ips.len(), 2);
        let mut done = p.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(workload_of(&done).is_none());
        // The label without the proxy container, or on a hostNetwork pod, is not enough.
        let mut claimed = p.clone();
        claimed.spec.as_mut().unwrap().init_containers = None;
        assert!(workload_of(&claimed).is_none());
        let mut host = p.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(workload_of(&host).is_none());
        let mut classic = p.clone();
        let spec = classic.spec.as_mut().unwrap();
        spec.init_containers = None;
        spec.containers.insert(
            0,
            serde_json::from_value(serde_json::json!({"name": "palisade-proxy"})).unwrap(),
        );
        assert!(
            workload_of(&classic).is_some(),
            "the proxy as the first container counts"
        );
        let mut plain = p;
        plain
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(INJECTED_LABEL);
        assert!(workload_of(&plain).is_none());
    }

    #[test]
    fn namespaces_without_the_annotation_get_the_mesh_default() {
        let ns = |json: serde_json::Value| -> Namespace { serde_json::from_value(json).unwrap() };
        let mut objects = ClusterObjects::default();
        objects.namespaces.apply(Event::Init, namespace_info);
        for n in [
            ns(
                serde_json::json!({"metadata": {"name": "shop", "annotations": {"palisade.dev/default-policy": "all"}, "labels": {"palisade.dev/inject": "enabled"}}}),
            ),
            ns(serde_json::json!({"metadata": {"name": "plain"}})),
            ns(
                serde_json::json!({"metadata": {"name": "typo", "annotations": {"palisade.dev/default-policy": "allow"}}}),
            ),
        ] {
            objects
                .namespaces
                .apply(Event::InitApply(n), namespace_info);
        }
        objects.namespaces.apply(Event::InitDone, namespace_info);
        let state = objects.mesh_state("cluster.local", DefaultPolicy::Deny);
        assert_eq!(
            state.namespace_defaults.get("shop"),
            Some(&DefaultPolicy::All)
        );
        assert_eq!(state.namespace_defaults.get("plain"), None);
        assert_eq!(
            state.namespace_defaults.get("typo"),
            None,
            "an invalid value is ignored"
        );
        assert_eq!(state.default_policy, DefaultPolicy::Deny);
        assert_eq!(objects.opted_in(), BTreeSet::from(["shop".to_owned()]));
    }

    #[test]
    fn rejections_say_why() {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "typo",
            "annotations": {"palisade.dev/default-policy": "allow"}}}))
        .unwrap();
        assert_eq!(
            default_policy_of(&ns),
            Err("\"allow\" is not a default policy: use deny, all-authenticated or all".to_owned())
        );
        let policy = |spec: serde_json::Value| -> MeshPolicy {
            serde_json::from_value(
                serde_json::json!({"apiVersion": "palisade.dev/v1alpha1", "kind": "MeshPolicy",
                "metadata": {"name": "p", "namespace": "shop"}, "spec": spec}),
            )
            .unwrap()
        };
        assert_eq!(
            usable_policy(&policy(serde_json::json!({"ports": [0]}))),
            Err("port 0 is not a port".to_owned())
        );
        let bad_selector = serde_json::json!({"targetSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}});
        assert_eq!(
            usable_policy(&policy(bad_selector)),
            Err("matchExpressions[0]: operator In needs values".to_owned())
        );
        assert!(policy_of(&policy(serde_json::json!({"ports": [0]}))).is_none());
        assert!(usable_policy(&policy(serde_json::json!({}))).is_ok());
    }

    #[test]
    fn relist_replaces_only_when_complete() {
        let mut t: Tracked<Workload> = Tracked::default();
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n", "labels": {"palisade.dev/injected": "true"}},
            "spec": {"containers": [{"name": "palisade-proxy"}]},
            "status": {"podIP": "10.0.0.1"}
        }));
        t.apply(Event::Init, workload_of);
        t.apply(Event::InitApply(p.clone()), workload_of);
        assert_eq!(t.values().count(), 0);
        assert!(t.apply(Event::InitDone, workload_of));
        assert_eq!(t.values().count(), 1);
        t.apply(Event::Init, workload_of);
        assert_eq!(
            t.values().count(),
            1,
            "a relist in progress keeps the last good list"
        );
        t.apply(Event::InitDone, workload_of);
        assert_eq!(t.values().count(), 0);
    }
}
