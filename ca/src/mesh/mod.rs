//! Control-plane state: workloads, policies and namespace defaults, from whichever source, and
//! the view of it that one proxy's watch asks for.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::{DefaultPolicy, InboundPolicy, NamedPolicy, policies_selecting};
use palisade_ca_api::wire::{
    Destination, MAX_SERVICE_ENDPOINTS, PortMapping, ServiceAnswer, ServiceEndpoint, WatchMessage,
    WatchMessageKind, WatchQuery,
};

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

/// A Kubernetes Service: its addresses, its ports, and its ready endpoints as the source gives
/// them (EndpointSlices, or the workloads a mesh file's selector picks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Empty for a headless Service (DNS gives pod IPs; nothing to answer).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
}

/// One ready endpoint of a Service and the target port of each Service port it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ports: Vec<PortMapping>,
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
    services: Vec<Service>,
    by_cluster_ip: HashMap<IpAddr, usize>,
}

impl MeshState {
    pub fn new(
        trust_domain: String,
        default_policy: DefaultPolicy,
        namespace_defaults: HashMap<String, DefaultPolicy>,
        workloads: Vec<Workload>,
        policies: Vec<NamedPolicy>,
        services: Vec<Service>,
    ) -> Self {
        let by_ip = workloads
            .iter()
            .enumerate()
            .flat_map(|(i, w)| w.ips.iter().map(move |ip| (*ip, i)))
            .collect();
        let by_cluster_ip = services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.cluster_ips.iter().map(move |ip| (*ip, i)))
            .collect();
        MeshState {
            trust_domain,
            default_policy,
            namespace_defaults,
            workloads,
            by_ip,
            policies,
            services,
            by_cluster_ip,
        }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn service_at(&self, ip: IpAddr) -> Option<&Service> {
        self.by_cluster_ip.get(&ip).map(|i| &self.services[*i])
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

    /// What the control plane says about `address` to the watch of `asker` (whose pod IP
    /// picks the subset of a Service too large to answer whole).
    pub fn destination(&self, address: IpAddr, asker: Option<IpAddr>) -> Destination {
        if let Some(service) = self.service_at(address) {
            return Destination {
                service: Some(self.service_answer(service, asker)),
                ..Destination::unmeshed(address)
            };
        }
        match self.workload_at(address) {
            Some(w) => match self.spiffe_id(w) {
                Some(id) => {
                    Destination::meshed(address, id, Some(format!("{}/{}", w.namespace, w.name)))
                }
                None => Destination {
                    meshed: true,
                    ..Destination::unmeshed(address)
                },
            },
            None => Destination::unmeshed(address),
        }
    }

    /// A Service's answer: its ports and ready endpoints, each said meshed (with the identity
    /// to expect) when a meshed workload has its address. At most [`MAX_SERVICE_ENDPOINTS`],
    /// chosen by [`subset`].
    pub fn service_answer(&self, service: &Service, asker: Option<IpAddr>) -> ServiceAnswer {
        let chosen = subset(&service.endpoints, asker, MAX_SERVICE_ENDPOINTS);
        let endpoints = chosen
            .into_iter()
            .map(|e| {
                let workload = self.workload_at(e.address);
                ServiceEndpoint {
                    address: e.address,
                    ports: e.ports.clone(),
                    meshed: workload.is_some(),
                    spiffe_id: workload.and_then(|w| self.spiffe_id(w)),
                    workload: workload.map(|w| format!("{}/{}", w.namespace, w.name)),
                }
            })
            .collect();
        ServiceAnswer {
            name: format!("{}/{}", service.namespace, service.name),
            ports: service.ports.clone(),
            endpoints,
            total_endpoints: service.endpoints.len(),
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
                .map(|d| self.destination(*d, query.pod_ip))
                .collect(),
            trust_bundle: Vec::new(),
            renew: None,
        }
    }
}

/// At most `cap` of `endpoints`, sorted by address: all of them when they fit, else the `cap`
/// with the highest rendezvous score for `asker`. A change of one endpoint changes at most one
/// member of a subset, and different askers get different subsets, so load still reaches every
/// endpoint of a Service larger than the cap.
pub fn subset(endpoints: &[Endpoint], asker: Option<IpAddr>, cap: usize) -> Vec<&Endpoint> {
    let mut chosen: Vec<&Endpoint> = endpoints.iter().collect();
    if chosen.len() > cap {
        let score = |e: &Endpoint| {
            use std::hash::{Hash, Hasher};
            // Fixed keys: every replica and restart of one release picks the same subset.
            let mut h = std::hash::DefaultHasher::new();
            (asker, e.address).hash(&mut h);
            std::cmp::Reverse(h.finish())
        };
        chosen.select_nth_unstable_by_key(cap - 1, |e| score(e));
        chosen.truncate(cap);
    }
    chosen.sort_by_key(|e| e.address);
    chosen
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
