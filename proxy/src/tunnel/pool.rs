//! The outbound pool: tunnels by (destination address, expected identity). A tunnel takes new
//! streams only while it is fresh (`super::still_fresh`) and not full; otherwise the pool makes
//! another, and the old one drains: its open streams go on, and it closes with the last one.
//! Callers that find no usable tunnel wait for one handshake per key rather than each making
//! their own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use palisade_ca_api::SpiffeId;
use tokio::time::Instant;

use super::{Generations, IDLE_TUNNEL, MAX_POOL_KEYS, TUNNEL_LESS_FOR, still_fresh};
use crate::datapath::DataPath;

/// A destination as the pool tells them apart: its address (a pod's address is one pod, and
/// one proxy in front of all its ports), and the port too on loopback, where tests and demos
/// run several proxies on one address.
type Place = (IpAddr, u16);
type Key = (Place, SpiffeId);

fn place(dst: SocketAddr) -> Place {
    if dst.ip().is_loopback() {
        (dst.ip(), dst.port())
    } else {
        (dst.ip(), 0)
    }
}

/// Outbound tunnels, and the destinations known not to speak them.
#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    tunnel_less: Mutex<HashMap<Place, Instant>>,
}

/// The tunnels of one key, and the lock that makes one handshake at a time for it.
#[derive(Default)]
pub(super) struct Slot {
    tunnels: Mutex<Vec<Arc<Tunnel>>>,
    pub(super) making: tokio::sync::Mutex<()>,
}

/// One tunnel: the h2 client handle and what it was verified under.
pub(super) struct Tunnel {
    pub(super) send: h2::client::SendRequest<Bytes>,
    made: Generations,
    /// Unix seconds: the earlier of the own leaf's and the peer leaf's `notAfter`.
    until: i64,
    state: Mutex<TunnelState>,
}

struct TunnelState {
    streams: usize,
    idle_since: Instant,
    /// Takes no new stream; set when stale, idle, refused by the peer, or its connection ended.
    retired: bool,
}

/// One stream's hold on a tunnel: counted against its capacity, and it keeps the tunnel's
/// connection open, until dropped.
pub struct Claim {
    pub(super) tunnel: Arc<Tunnel>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut s = self.tunnel.lock();
        s.streams = s.streams.saturating_sub(1);
        if s.streams == 0 {
            s.idle_since = Instant::now();
        }
    }
}

impl Tunnel {
    pub(super) fn new(
        send: h2::client::SendRequest<Bytes>,
        made: Generations,
        until: i64,
    ) -> Arc<Self> {
        Arc::new(Tunnel {
            send,
            made,
            until,
            state: Mutex::new(TunnelState {
                streams: 0,
                idle_since: Instant::now(),
                retired: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TunnelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes no new stream from now on; it closes when its last stream ends.
    pub(super) fn retire(&self) {
        self.lock().retired = true;
    }

    /// Claims a stream when the tunnel is fresh, open and not full.
    fn claim(self: &Arc<Self>, dp: &DataPath) -> Option<Claim> {
        let fresh = still_fresh(
            self.made,
            Generations::now(dp),
            self.until,
            dp.store.clock().unix(),
        );
        let mut s = self.lock();
        if !fresh {
            s.retired = true;
        }
        let limit = self.send.current_max_send_streams();
        if s.retired || s.streams >= limit {
            return None;
        }
        s.streams += 1;
        drop(s);
        Some(Claim {
            tunnel: self.clone(),
        })
    }

    fn retired(&self) -> bool {
        self.lock().retired
    }

    /// Retires the tunnel when it has had no stream for [`IDLE_TUNNEL`]; true when it is
    /// retired and has no stream left, so its connection may close.
    pub(super) fn close_if_idle(&self) -> bool {
        let mut s = self.lock();
        if s.streams == 0 && s.idle_since.elapsed() >= IDLE_TUNNEL {
            s.retired = true;
        }
        s.retired && s.streams == 0
    }
}

impl Slot {
    /// A stream on a usable tunnel, forgetting the ones that are retired.
    pub(super) fn claim(&self, dp: &DataPath) -> Option<Claim> {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        tunnels.retain(|t| {
            if found.is_none()
                && let Some(c) = t.claim(dp)
            {
                found = Some(c);
            }
            !t.retired()
        });
        found
    }

    pub(super) fn add(&self, tunnel: Arc<Tunnel>) {
        self.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tunnel);
    }

    fn idle(&self) -> bool {
        let tunnels = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        tunnels.iter().all(|t| t.lock().streams == 0)
    }
}

impl Pool {
    /// The slot of a key, made when absent. At [`MAX_POOL_KEYS`], idle keys are dropped first
    /// (their tunnels close); a pool full of busy keys drops all of them, the tunnels
    /// draining as they would after a rotation.
    pub(super) fn slot(&self, dst: SocketAddr, expected: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (place(dst), expected.clone());
        if let Some(s) = slots.get(&key) {
            return s.clone();
        }
        if slots.len() >= MAX_POOL_KEYS {
            slots.retain(|_, s| !s.idle());
            if slots.len() >= MAX_POOL_KEYS {
                slots.clear();
            }
        }
        slots.entry(key).or_default().clone()
    }

    /// Whether `dst`'s proxy answered without the tunnel ALPN lately.
    pub fn is_tunnel_less(&self, dst: SocketAddr) -> bool {
        let mut map = self.tunnel_less.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&place(dst)) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                map.remove(&place(dst));
                false
            }
            None => false,
        }
    }

    pub(super) fn mark_tunnel_less(&self, dst: SocketAddr) {
        let mut map = self.tunnel_less.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_POOL_KEYS {
            let now = Instant::now();
            map.retain(|_, until| now < *until);
            if map.len() >= MAX_POOL_KEYS {
                map.clear();
            }
        }
        map.insert(place(dst), Instant::now() + TUNNEL_LESS_FOR);
    }
}

/// How often a tunnel's connection task looks whether it has been idle too long.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(15);

/// Drives a tunnel's h2 connection until it ends, or until the tunnel is retired or idle with
/// no stream left. Holds the tunnel weakly, so the pool dropping it and its last stream ending
/// also ends the connection (h2 closes it when no handle is left).
pub(super) async fn drive<C>(conn: C, tunnel: Weak<Tunnel>)
where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel ended");
                }
                if let Some(t) = tunnel.upgrade() {
                    t.retire();
                }
                return;
            }
            _ = tokio::time::sleep(IDLE_CHECK) => {
                if tunnel.upgrade().is_some_and(|t| t.close_if_idle()) {
                    tracing::debug!("tunnel idle: closed");
                    return;
                }
            }
        }
    }
}
