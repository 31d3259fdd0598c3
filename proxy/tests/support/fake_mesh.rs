//! An in-process control plane for the mesh watch: state a test edits, streams that follow
//! it, and a switch to take it down.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use palisade_ca_api::policy::InboundPolicy;
use palisade_ca_api::wire::{
    Destination, RenewRequest, WatchMessage, WatchMessageKind, WatchQuery,
};
use palisade_proxy::source::{BoxFuture, MeshWatcher, SourceError, WatchEvents};
use tokio::sync::watch;

pub struct FakeMesh {
    pub up: AtomicBool,
    pub queries: Mutex<Vec<WatchQuery>>,
    inbound: Mutex<Option<InboundPolicy>>,
    destinations: Mutex<HashMap<IpAddr, Destination>>,
    trust_bundle: Mutex<Vec<String>>,
    renew: Mutex<Option<RenewRequest>>,
    version: watch::Sender<u64>,
    /// Bumped to break every open stream.
    generation: watch::Sender<u64>,
}

impl FakeMesh {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeMesh {
            up: AtomicBool::new(true),
            queries: Mutex::new(Vec::new()),
            inbound: Mutex::new(None),
            destinations: Mutex::new(HashMap::new()),
            trust_bundle: Mutex::new(Vec::new()),
            renew: Mutex::new(None),
            version: watch::channel(1).0,
            generation: watch::channel(0).0,
        })
    }

    pub fn set_inbound(&self, p: InboundPolicy) {
        *self.inbound.lock().unwrap() = Some(p);
        self.version.send_modify(|v| *v += 1);
    }

    pub fn set_destination(&self, d: Destination) {
        self.destinations.lock().unwrap().insert(d.address, d);
        self.version.send_modify(|v| *v += 1);
    }

    /// The trust bundle every message carries from now on (PEM texts; empty: none).
    pub fn set_trust_bundle(&self, pems: Vec<String>) {
        *self.trust_bundle.lock().unwrap() = pems;
        self.version.send_modify(|v| *v += 1);
    }

    /// The early-renewal request every message carries from now on.
    pub fn set_renew(&self, renew: Option<RenewRequest>) {
        *self.renew.lock().unwrap() = renew;
        self.version.send_modify(|v| *v += 1);
    }

    /// Sends every open watch an update with nothing new in it.
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Takes the control plane down (open streams fail, new watches are refused) or up.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn watches(&self) -> usize {
        self.queries.lock().unwrap().len()
    }

    pub fn last_query(&self) -> Option<WatchQuery> {
        self.queries.lock().unwrap().last().cloned()
    }

    fn message(&self, query: &WatchQuery, kind: WatchMessageKind) -> WatchMessage {
        let dests = self.destinations.lock().unwrap();
        WatchMessage {
            kind,
            version: *self.version.borrow(),
            inbound: query.pod_ip.and(self.inbound.lock().unwrap().clone()),
            destinations: query
                .destinations
                .iter()
                .map(|ip| dests.get(ip).cloned().unwrap_or(Destination::unmeshed(*ip)))
                .collect(),
            trust_bundle: self.trust_bundle.lock().unwrap().clone(),
            renew: self.renew.lock().unwrap().clone(),
        }
    }
}

struct FakeStream {
    mesh: Arc<FakeMesh>,
    query: WatchQuery,
    sent_snapshot: bool,
    version: watch::Receiver<u64>,
    generation: watch::Receiver<u64>,
}

impl WatchEvents for FakeStream {
    fn next_message(&mut self) -> BoxFuture<'_, Result<Option<WatchMessage>, SourceError>> {
        Box::pin(async move {
            if !self.sent_snapshot {
                self.sent_snapshot = true;
                self.version.borrow_and_update();
                return Ok(Some(
                    self.mesh.message(&self.query, WatchMessageKind::Snapshot),
                ));
            }
            tokio::select! {
                r = self.version.changed() => {
                    r.map_err(|_| SourceError::Transport("gone".into()))?;
                    Ok(Some(self.mesh.message(&self.query, WatchMessageKind::Update)))
                }
                _ = self.generation.changed() => Err(SourceError::Transport("control plane went away".into())),
            }
        })
    }
}

/// The fake as the proxy sees it.
pub struct FakeMeshSource(pub Arc<FakeMesh>);

impl FakeMesh {
    pub fn source(self: &Arc<Self>) -> Arc<dyn MeshWatcher> {
        Arc::new(FakeMeshSource(self.clone()))
    }
}

impl MeshWatcher for FakeMeshSource {
    fn watch<'a>(
        &'a self,
        query: &'a WatchQuery,
    ) -> BoxFuture<'a, Result<Box<dyn WatchEvents>, SourceError>> {
        Box::pin(async move {
            let this = &self.0;
            this.queries.lock().unwrap().push(query.clone());
            if !this.up.load(Ordering::SeqCst) {
                return Err(SourceError::Transport("connection refused".into()));
            }
            let mut generation = this.generation.subscribe();
            generation.borrow_and_update();
            Ok(Box::new(FakeStream {
                mesh: this.clone(),
                query: query.clone(),
                sent_snapshot: false,
                version: this.version.subscribe(),
                generation,
            }) as Box<dyn WatchEvents>)
        })
    }
}
