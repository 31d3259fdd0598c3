//! What the control plane says: the inbound policy of this workload, and for each destination
//! the proxy has met, whether it is meshed and which identity it must present.
//!
//! One watch stream carries both (`pod_ip` plus the destinations asked about). When a new
//! destination appears the stream is reopened with the accumulated set (after a short
//! debounce, so a burst of new destinations costs one reopen). The set is bounded: past
//! `max_destinations` the least recently used one is dropped, so memory does not grow with
//! the size of the cluster. Answers survive a control-plane outage: the last state keeps
//! serving; only destinations never answered fail closed.
//!
//! The watch also carries the proxy's side of a root rotation: its connection presents the
//! current leaf and its query names the roots trusted now (`root=`), so it is reopened when
//! either changes; its messages may bring a new trust bundle or ask for an early renewal.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::sha256_fingerprint;
use palisade_ca_api::policy::InboundPolicy;
use palisade_ca_api::wire::{
    Destination, MAX_WATCH_DESTINATIONS, MAX_WATCH_ROOTS, ServiceAnswer, WatchMessage, WatchQuery,
};
use tokio::sync::{Notify, watch};

use crate::identity::{CertStore, EarlyRenewal, jittered_backoff};
use crate::source::MeshWatcher;
use crate::tls::{Offer, TrustBundle, parse_pem_list};

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

/// The proxy's own credentials as the watch concerns them: the leaf is the watch
/// connection's client certificate, the roots are its `root=` fingerprints, and a message may
/// bring a new trust bundle or ask for an early renewal.
pub struct Credentials {
    pub store: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub early: Arc<EarlyRenewal>,
}

/// The proxy's view of the control plane.
pub struct MeshView {
    config: MeshConfig,
    inbound: ArcSwapOption<InboundPolicy>,
    first_message: AtomicBool,
    table: Mutex<DestinationTable>,
    changed: watch::Sender<u64>,
    interest: Notify,
    /// Absent for a proxy without a control plane for its identity (static certificates).
    credentials: Option<Credentials>,
    /// Digest of the trust bundle last refused, so that the refusal is logged once, not with
    /// every message.
    refused_bundle: Mutex<Option<String>>,
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
            credentials: None,
            refused_bundle: Mutex::new(None),
        }
    }

    /// The view of a proxy whose identity the control plane manages.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
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
        let generation = self.credentials.as_ref().map(|c| c.bundle.generation());
        self.apply_from(message, generation.unwrap_or_default());
    }

    /// [`MeshView::apply`] for a message of a watch opened when the trust bundle was at
    /// `generation`: a bundle it offers is adopted only if the roots have not changed since,
    /// since the connection that brought it was verified against those roots.
    pub fn apply_from(&self, message: &WatchMessage, generation: u64) {
        if self.config.pod_ip.is_some() {
            self.inbound.store(message.inbound.clone().map(Arc::new));
        }
        self.table().apply(&message.destinations);
        self.first_message.store(true, Ordering::Release);
        self.changed.send_modify(|v| *v = message.version);
        if let Some(credentials) = &self.credentials {
            self.offer_trust_bundle(credentials, &message.trust_bundle, generation);
            if let Some(renew) = &message.renew {
                credentials.early.directive(renew);
            }
        }
    }

    /// A trust bundle on the watch: adopted at once under the rule of the certificate answers
    /// ([`TrustBundle::judge_offer`]); refused or unreadable, it is logged once and the current
    /// bundle stays. An adoption changes the roots of the query, so the watch is reopened.
    fn offer_trust_bundle(&self, credentials: &Credentials, pems: &[String], generation: u64) {
        if pems.is_empty() {
            return;
        }
        let mut refused = self
            .refused_bundle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let digest = sha256_fingerprint(pems.concat().as_bytes());
        let first_refusal = refused.as_deref() != Some(digest.as_str());
        let offered = match parse_pem_list(pems) {
            Ok(offered) => offered,
            Err(e) => {
                if first_refusal {
                    tracing::warn!(error = %e,
                        "the mesh watch sent a trust bundle that is not valid PEM; keeping the current bundle");
                    *refused = Some(digest);
                }
                return;
            }
        };
        match credentials.bundle.judge_offer(offered) {
            Offer::Keep => *refused = None,
            Offer::Adopt(roots) => {
                *refused = None;
                match credentials.bundle.replace_at(generation, roots.clone()) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(
                            "the trust bundle changed while this watch was open: its offer is ignored, and the watch reopens"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e,
                            "the mesh watch sent an unusable trust bundle; keeping the current bundle");
                        return;
                    }
                }
                tracing::info!(
                    roots = roots.len(),
                    "trust bundle from the mesh watch adopted"
                );
                credentials.early.unless_leaf_chains_to(&roots);
            }
            Offer::Refuse => {
                if first_refusal {
                    tracing::warn!(
                        "the mesh watch sent a trust bundle that shares no root with the current one; keeping the current bundle"
                    );
                    *refused = Some(digest);
                }
            }
        }
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
            roots: self.roots(),
        }
    }

    /// The fingerprints of the roots trusted now, as the query says them. A bundle never holds
    /// more than the watch accepts; if one did, the watch would still open.
    fn roots(&self) -> Vec<String> {
        let Some(credentials) = &self.credentials else {
            return Vec::new();
        };
        let mut roots = credentials.bundle.fingerprints();
        roots.truncate(MAX_WATCH_ROOTS);
        roots
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

/// What, besides new destinations, makes the watch reopen: a new leaf (the CA reads it from
/// the connection) and new roots (the query names them).
struct Reopen {
    store: Option<Arc<CertStore>>,
    installs: Option<watch::Receiver<u64>>,
    roots: Option<watch::Receiver<u64>>,
}

impl Reopen {
    fn new(credentials: Option<&Credentials>) -> Self {
        Reopen {
            store: credentials.map(|c| c.store.clone()),
            installs: credentials.map(|c| c.store.installs()),
            roots: credentials.map(|c| c.bundle.changes()),
        }
    }

    /// Before a watch is opened: what happened so far is what it will carry.
    fn opening(&mut self) {
        for rx in [&mut self.installs, &mut self.roots].into_iter().flatten() {
            rx.borrow_and_update();
        }
    }

    fn has_valid_leaf(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.valid().is_some())
    }

    /// A watch opened while the proxy had no valid leaf could only be opened (it needs mTLS)
    /// once one arrived: it carries that one, so its install is no reason to reopen. Without
    /// this, every start-up would open its watch twice.
    fn opened(&mut self, had_valid_leaf: bool) {
        if !had_valid_leaf && let Some(rx) = &mut self.installs {
            rx.borrow_and_update();
        }
    }
}

/// The next change on `rx`; never, without one.
async fn next_change(rx: &mut Option<watch::Receiver<u64>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Keeps one watch open with what `state` needs, reopening it when that grows (or the
/// proxy's leaf or roots change) and retrying with capped backoff when the control plane is
/// away. Returns when `shutdown` turns true.
pub async fn run_watch(
    state: Arc<MeshView>,
    source: Arc<dyn MeshWatcher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    let mut reopen = Reopen::new(state.credentials.as_ref());
    loop {
        reopen.opening();
        let query = state.query();
        if query.pod_ip.is_none() && query.destinations.is_empty() {
            tokio::select! {
                _ = state.interest.notified() => continue,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let failed = tokio::select! {
            failed = follow(&state, source.as_ref(), &query, &mut attempt, &mut reopen) => failed,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if failed {
            let wait =
                jittered_backoff(attempt, state.config.backoff_base, state.config.backoff_cap);
            attempt = attempt.saturating_add(1);
            // A new leaf or new roots may be what the CA was refusing: try them at once.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = next_change(&mut reopen.installs) => {}
                _ = next_change(&mut reopen.roots) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Follows one watch until it fails (true) or must be reopened (false): with a new query, or
/// with the same one over a connection that presents a new certificate.
async fn follow(
    state: &MeshView,
    source: &dyn MeshWatcher,
    query: &WatchQuery,
    attempt: &mut u32,
    reopen: &mut Reopen,
) -> bool {
    let had_valid_leaf = reopen.has_valid_leaf();
    // The roots this watch's connection is verified against (see `MeshView::apply_from`).
    let generation = state
        .credentials
        .as_ref()
        .map_or(0, |c| c.bundle.generation());
    let mut stream = match source.watch(query).await {
        Ok(s) => {
            reopen.opened(had_valid_leaf);
            s
        }
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
                    state.apply_from(&m, generation);
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
            _ = next_change(&mut reopen.installs) => {
                tracing::debug!("a new certificate is installed: reopening the mesh watch so that the CA sees it");
                return false;
            }
            _ = next_change(&mut reopen.roots) => {
                if state.query() != *query {
                    tracing::debug!("the trust bundle changed: reopening the mesh watch to confirm it");
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
