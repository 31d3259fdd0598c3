//! The mesh watch stream: a snapshot, then an update whenever this watch's view changes.

use bytes::Bytes;
use futures_util::Stream;
use palisade_ca_api::wire::{WatchMessage, WatchMessageKind, WatchQuery};

use super::Snapshot;

/// Newline-delimited JSON messages for `query`, ending when `shutdown` fires or the publisher
/// goes away. Changes that do not touch this view send nothing.
pub fn watch_stream(
    mut rx: tokio::sync::watch::Receiver<Snapshot>,
    query: WatchQuery,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let first = {
        let snap = rx.borrow_and_update();
        snap.state
            .view(&query, WatchMessageKind::Snapshot, snap.version)
    };
    let line = encode(&first);
    let state = (rx, query, first, Some(line));
    futures_util::stream::unfold(state, move |(mut rx, query, mut last, pending)| {
        let mut shutdown = shutdown.clone();
        async move {
            if let Some(line) = pending {
                return Some((line, (rx, query, last, None)));
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => changed.ok()?,
                    _ = shutdown.changed() => return None,
                }
                let next = {
                    let snap = rx.borrow_and_update();
                    snap.state
                        .view(&query, WatchMessageKind::Update, snap.version)
                };
                if next.inbound != last.inbound || next.destinations != last.destinations {
                    let line = encode(&next);
                    last = next;
                    return Some((line, (rx, query, last, None)));
                }
            }
        }
    })
}

fn encode(message: &WatchMessage) -> Bytes {
    let mut v = serde_json::to_vec(message).expect("watch messages serialize");
    v.push(b'\n');
    Bytes::from(v)
}
