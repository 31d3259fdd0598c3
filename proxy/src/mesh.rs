//! What the control plane says: the inbound policy of this workload, and for each destination
//! the proxy has met, whether it is meshed and which identity it must present.
//!
//! One watch stream carries both (`pod_ip` plus the destinations asked about). When a new
//! destination appears the stream is reopened with the accumulated set (after a short
//! debounce, so a burst of new destinations costs one reopen). The set is bounded: past
//! `max_destinations` the least recently used one is dropped, so memory does not grow with
//! the size of the cluster. Answers survive a control-plane outage: the last state keeps
//! serving; only destinations never answered fail closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::InboundPolicy;
use palisade_ca_api::wire::{
    Destination, MAX_WATCH_DESTINATIONS, ServiceAnswer, WatchMessage, WatchQuery,
};
use tokio::sync::{Notify, watch};

use crate::identity::backoff;
use crate::source::MeshWatcher;

#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This workload's address, whose inbound policy is watched.
    pub pod_ip: Option<IpAddr>,
    /// Destinations remembered at once (at most [`MAX_WATCH_DESTINATIONS`]).
    pub max_destinations: usize,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long to gather new destinations before reopening the watch.
    pub debounce: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            pod_ip: None,
            max_destinations: MAX_WATCH_DESTINATIONS,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            debounce: Duration::from_millis(20),
        }
    }
}

/// The control plane's answer on one address, prepared for the data path: a Service's
/// endpoints are indexed by Service port once per update, not once per connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub destination: Destination,
    pub service: Option<ServiceRoutes>,
}

impl std::ops::Deref for Answer {
    type Target = Destination;
    fn deref(&self) -> &Destination {
        &self.destination
    }
}

impl From<Destination> for Answer {
    fn from(mut destination: Destination) -> Self {
        let service = destination.service.take().map(ServiceRoutes::from);
        Answer {
            destination,
            service,
        }
    }
}

/// A Service's endpoints by Service port.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceRoutes {
    /// `namespace/name`.
    pub name: Arc<str>,
    /// Each Service port with the endpoints that serve it (possibly none).
    pub ports: HashMap<u16, Arc<[Target]>>,
}

/// Where a connection to a Service port may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The identity the endpoint must present; `None` for an endpoint without a proxy.
    pub identity: Option<SpiffeId>,
}

impl From<ServiceAnswer> for ServiceRoutes {
    fn from(answer: ServiceAnswer) -> Self {
        let ports = answer
            .ports
            .iter()
            .map(|port| {
                let targets: Arc<[Target]> = answer
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        Some(Target {
                            addr: SocketAddr::new(e.address, e.target_port(*port)?),
                            identity: if e.meshed { e.spiffe_id.clone() } else { None },
                        })
                    })
                    .collect();
                (*port, targets)
            })
            .collect();
        ServiceRoutes {
            name: answer.name.into(),
            ports,
        }
    }
}

#[derive(Debug)]
struct Entry {
    answer: Option<Arc<Answer>>,
    last_used: u64,
}

/// The destinations asked about, least-recently-used bounded. Pure bookkeeping.
#[derive(Debug)]
pub struct DestinationTable {
    entries: HashMap<IpAddr, Entry>,
    tick: u64,
    cap: usize,
}

impl DestinationTable {
    pub fn new(cap: usize) -> Self {
        DestinationTable {
            entries: HashMap::new(),
            tick: 0,
            cap: cap.clamp(1, MAX_WATCH_DESTINATIONS),
        }
    }

    /// Marks `ip` used; adds it when absent (evicting the least recently used past the cap).
    /// Returns its answer, if any, and whether it was added.
    pub fn touch(&mut self, ip: IpAddr) -> (Option<Arc<Answer>>, bool) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&ip) {
            e.last_used = tick;
            return (e.answer.clone(), false);
        }
        if self.entries.len() >= self.cap
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(ip, _)| *ip)
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(
            ip,
            Entry {
                answer: None,
                last_used: tick,
            },
        );
        (None, true)
    }

    pub fn answer(&self, ip: IpAddr) -> Option<Arc<Answer>> {
        self.entries.get(&ip).and_then(|e| e.answer.clone())
    }

    /// The addresses to ask about, sorted.
    pub fn wanted(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.entries.keys().copied().collect();
        v.sort();
        v
    }

    /// Records the answers of a watch message for the addresses still remembered.
    pub fn apply(&mut self, destinations: &[Destination]) {
        for d in destinations {
            if let Some(e) = self.entries.get_mut(&d.address) {
                e.answer = Some(Arc::new(Answer::from(d.clone())));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The proxy's view of the control plane.
pub struct MeshView {
    config: MeshConfig,
    inbound: ArcSwapOption<InboundPolicy>,
    first_message: AtomicBool,
    table: Mutex<DestinationTable>,
    changed: watch::Sender<u64>,
    interest: Notify,
}

impl std::fmt::Debug for MeshView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshView")
            .field("inbound", &self.inbound.load().is_some())
            .finish_non_exhaustive()
    }
}

impl MeshView {
    pub fn new(config: MeshConfig) -> Self {
        MeshView {
            table: Mutex::new(DestinationTable::new(config.max_destinations)),
            config,
            inbound: ArcSwapOption::empty(),
            first_message: AtomicBool::new(false),
            changed: watch::channel(0).0,
            interest: Notify::new(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, DestinationTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The inbound policy, once the control plane has sent one.
    pub fn inbound(&self) -> Option<Arc<InboundPolicy>> {
        self.inbound.load_full()
    }

    /// Whether a first message has arrived (part of readiness).
    pub fn has_snapshot(&self) -> bool {
        self.first_message.load(Ordering::Acquire)
    }

    /// Replaces the state with one watch message (each is complete for what was asked).
    pub fn apply(&self, message: &WatchMessage) {
        if self.config.pod_ip.is_some() {
            self.inbound.store(message.inbound.clone().map(Arc::new));
        }
        self.table().apply(&message.destinations);
        self.first_message.store(true, Ordering::Release);
        self.changed.send_modify(|v| *v = message.version);
    }

    /// Installs an inbound policy directly (tests and the demo without a control plane).
    pub fn set_inbound(&self, policy: Option<InboundPolicy>) {
        self.inbound.store(policy.map(Arc::new));
        self.first_message.store(true, Ordering::Release);
    }

    /// Records an answer directly (tests and the demo without a control plane).
    pub fn set_destination(&self, destination: Destination) {
        let mut t = self.table();
        t.touch(destination.address);
        t.apply(std::slice::from_ref(&destination));
        drop(t);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn query(&self) -> WatchQuery {
        WatchQuery {
            pod_ip: self.config.pod_ip,
            destinations: self.table().wanted(),
            roots: Vec::new(),
        }
    }

    /// What the control plane says about `ip`, waiting at most `wait` for a first answer.
    /// `None` means it could not say: the caller must fail closed.
    pub async fn lookup(&self, ip: IpAddr, wait: Duration) -> Option<Arc<Answer>> {
        let mut changed = self.changed.subscribe();
        let (answer, added) = self.table().touch(ip);
        if answer.is_some() {
            return answer;
        }
        if added {
            self.interest.notify_one();
        }
        tokio::time::timeout(wait, async {
            loop {
                changed.changed().await.ok()?;
                if let Some(a) = self.table().answer(ip) {
                    return Some(a);
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// Keeps one watch open with what `state` needs, reopening it when that grows and retrying
/// with capped backoff when the control plane is away. Returns when `shutdown` turns true.
pub async fn run_watch(
    state: Arc<MeshView>,
    source: Arc<dyn MeshWatcher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    loop {
        let query = state.query();
        if query.pod_ip.is_none() && query.destinations.is_empty() {
            tokio::select! {
                _ = state.interest.notified() => continue,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let failed = tokio::select! {
            failed = follow(&state, source.as_ref(), &query, &mut attempt) => failed,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if failed {
            let wait = backoff(attempt, state.config.backoff_base, state.config.backoff_cap);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Follows one watch until it fails (true) or must be reopened with a new query (false).
async fn follow(
    state: &MeshView,
    source: &dyn MeshWatcher,
    query: &WatchQuery,
    attempt: &mut u32,
) -> bool {
    let mut stream = match source.watch(query).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the mesh watch; keeping the last known state");
            return true;
        }
    };
    loop {
        tokio::select! {
            message = stream.next_message() => match message {
                Ok(Some(m)) => {
                    *attempt = 0;
                    state.apply(&m);
                }
                Ok(None) => {
                    tracing::warn!("the control plane ended the mesh watch; reopening");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh watch failed; keeping the last known state");
                    return true;
                }
            },
            _ = state.interest.notified() => {
                tokio::time::sleep(state.config.debounce).await;
                if state.query() != *query {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn table_evicts_the_least_recently_used_past_its_cap() {
        let mut t = DestinationTable::new(2);
        assert_eq!(t.touch(ip("10.0.0.1")), (None, true));
        assert_eq!(t.touch(ip("10.0.0.2")), (None, true));
        assert_eq!(t.touch(ip("10.0.0.1")), (None, false));
        t.touch(ip("10.0.0.3"));
        assert_eq!(t.wanted(), vec![ip("10.0.0.1"), ip("10.0.0.3")]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn table_keeps_answers_only_for_remembered_addresses() {
        let mut t = DestinationTable::new(4);
        t.touch(ip("10.0.0.1"));
        t.apply(&[
            Destination::unmeshed(ip("10.0.0.1")),
            Destination::unmeshed(ip("10.0.0.9")),
        ]);
        assert!(t.answer(ip("10.0.0.1")).is_some());
        assert!(t.answer(ip("10.0.0.9")).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn cap_is_bounded_by_the_watch_limit() {
        let mut t = DestinationTable::new(100_000);
        for i in 0..1000u32 {
            t.touch(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(t.len(), MAX_WATCH_DESTINATIONS);
    }
}
