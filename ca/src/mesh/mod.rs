//! Control-plane state: workloads, policies and namespace defaults, from whichever source, and
//! the view of it that one proxy's watch asks for.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::{DefaultPolicy, InboundPolicy, NamedPolicy, policies_selecting};
use palisade_ca_api::wire::{Destination, WatchMessage, WatchMessageKind, WatchQuery};

pub mod file;
pub mod watch;

/// A meshed workload: a pod (or a group of pods sharing labels and identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

/// Everything the control plane knows, indexed for per-proxy views.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    pub trust_domain: String,
    pub default_policy: DefaultPolicy,
    /// The `palisade.dev/default-policy` of namespaces that set one.
    pub namespace_defaults: HashMap<String, DefaultPolicy>,
    workloads: Vec<Workload>,
    by_ip: HashMap<IpAddr, usize>,
    policies: Vec<NamedPolicy>,
}

impl MeshState {
    pub fn new(
        trust_domain: String,
        default_policy: DefaultPolicy,
        namespace_defaults: HashMap<String, DefaultPolicy>,
        workloads: Vec<Workload>,
        policies: Vec<NamedPolicy>,
    ) -> Self {
        let by_ip = workloads
            .iter()
            .enumerate()
            .flat_map(|(i, w)| w.ips.iter().map(move |ip| (*ip, i)))
            .collect();
        MeshState {
            trust_domain,
            default_policy,
            namespace_defaults,
            workloads,
            by_ip,
            policies,
        }
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    pub fn policies(&self) -> &[NamedPolicy] {
        &self.policies
    }

    pub fn workload_at(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|i| &self.workloads[*i])
    }

    pub fn spiffe_id(&self, w: &Workload) -> Option<SpiffeId> {
        SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account).ok()
    }

    /// The inbound policy of one workload.
    pub fn inbound_policy(&self, w: &Workload) -> InboundPolicy {
        InboundPolicy {
            trust_domain: self.trust_domain.clone(),
            workload: format!("{}/{}", w.namespace, w.name),
            namespace: w.namespace.clone(),
            default_policy: self
                .namespace_defaults
                .get(&w.namespace)
                .copied()
                .unwrap_or(self.default_policy),
            policies: policies_selecting(&self.policies, &w.namespace, &w.labels),
        }
    }

    pub fn destination(&self, address: IpAddr) -> Destination {
        match self.workload_at(address) {
            Some(w) => Destination {
                address,
                meshed: true,
                spiffe_id: self.spiffe_id(w),
                workload: Some(format!("{}/{}", w.namespace, w.name)),
            },
            None => Destination {
                address,
                meshed: false,
                spiffe_id: None,
                workload: None,
            },
        }
    }

    /// What one watch sees: its own inbound policy (when the pod is known) and the
    /// destinations it asked about. Its size depends on the query, not on the mesh.
    pub fn view(&self, query: &WatchQuery, kind: WatchMessageKind, version: u64) -> WatchMessage {
        WatchMessage {
            kind,
            version,
            inbound: query
                .pod_ip
                .and_then(|ip| self.workload_at(ip))
                .map(|w| self.inbound_policy(w)),
            destinations: query
                .destinations
                .iter()
                .map(|d| self.destination(*d))
                .collect(),
        }
    }
}

/// A state and the version it was published as.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    pub state: Arc<MeshState>,
}

/// Publishes control-plane state to every watch.
#[derive(Clone)]
pub struct MeshPublisher {
    tx: Arc<tokio::sync::watch::Sender<Snapshot>>,
}

impl MeshPublisher {
    pub fn new(initial: MeshState) -> Self {
        let (tx, _) = tokio::sync::watch::channel(Snapshot {
            version: 1,
            state: Arc::new(initial),
        });
        MeshPublisher { tx: Arc::new(tx) }
    }

    pub fn publish(&self, state: MeshState) {
        self.tx.send_modify(|s| {
            s.version += 1;
            s.state = Arc::new(state);
        });
    }

    pub fn current(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }
}
