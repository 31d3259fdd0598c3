//! The mesh watch stream: a snapshot, then an update whenever this watch's view changes. A
//! stream that watches a pod's address ends when that address stops being a workload of the
//! watcher's identity, and when the watcher's certificate expires.

use bytes::Bytes;
use futures_util::Stream;
use palisade_ca_api::wire::{WatchMessage, WatchMessageKind, WatchQuery};

use super::{Snapshot, Workload};
use crate::rotation::TrustView;

/// The identity a watch was opened with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub namespace: String,
    pub service_account: String,
}

impl Owner {
    /// Whether `w` runs as this identity.
    pub fn holds(&self, w: &Workload) -> bool {
        w.namespace == self.namespace && w.service_account == self.service_account
    }
}

/// Newline-delimited JSON messages for `query`, ending when `shutdown` fires, the publisher
/// goes away, `until` passes (the client certificate's expiry), or the watched pod address is
/// no longer a workload of `owner` (its pod went away, or another workload took the address).
/// Every message carries the trust bundle (and, while a rotation drains the previous
/// intermediate, the request to renew) from `trust`. Changes that do not touch this view send
/// nothing.
pub fn watch_stream(
    mut rx: tokio::sync::watch::Receiver<Snapshot>,
    mut trust: tokio::sync::watch::Receiver<TrustView>,
    query: WatchQuery,
    owner: Owner,
    until: tokio::time::Instant,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let first = {
        let snap = rx.borrow_and_update();
        let view = trust.borrow_and_update().clone();
        with_trust(
            snap.state
                .view(&query, WatchMessageKind::Snapshot, snap.version),
            &view,
        )
    };
    let line = encode(&first);
    let state = (rx, trust, query, first, Some(line));
    let owner = std::sync::Arc::new(owner);
    futures_util::stream::unfold(
        state,
        move |(mut rx, mut trust, query, mut last, pending)| {
            let mut shutdown = shutdown.clone();
            let owner = owner.clone();
            async move {
                if let Some(line) = pending {
                    return Some((line, (rx, trust, query, last, None)));
                }
                loop {
                    tokio::select! {
                        changed = rx.changed() => changed.ok()?,
                        changed = trust.changed() => changed.ok()?,
                        _ = shutdown.changed() => return None,
                        _ = tokio::time::sleep_until(until) => return None,
                    }
                    let next = {
                        let snap = rx.borrow_and_update();
                        if let Some(ip) = query.pod_ip
                            && !snap.state.workload_at(ip).is_some_and(|w| owner.holds(w))
                        {
                            return None;
                        }
                        let view = trust.borrow_and_update().clone();
                        with_trust(
                            snap.state
                                .view(&query, WatchMessageKind::Update, snap.version),
                            &view,
                        )
                    };
                    let unchanged = next.inbound == last.inbound
                        && next.destinations == last.destinations
                        && next.trust_bundle == last.trust_bundle
                        && next.renew == last.renew;
                    if !unchanged {
                        let line = encode(&next);
                        last = next;
                        return Some((line, (rx, trust, query, last, None)));
                    }
                }
            }
        },
    )
}

fn with_trust(mut message: WatchMessage, view: &TrustView) -> WatchMessage {
    message.trust_bundle = view.bundle_pem.as_ref().clone();
    message.renew = view.renew.clone();
    message
}

fn encode(message: &WatchMessage) -> Bytes {
    let mut v = serde_json::to_vec(message).expect("watch messages serialize");
    v.push(b'\n');
    Bytes::from(v)
}
