//! Pooled tunnels between proxies (docs/proxy.md, "Pooled tunnels"): one mTLS connection with
//! ALPN `palisade-tunnel/1` carries HTTP/2, and each app connection is one CONNECT stream on
//! it. The outbound side keeps a pool of tunnels per destination address and identity
//! (`pool`, `client`); the inbound side serves the streams, deciding policy per stream
//! (`server`); `relay` moves bytes between a TCP connection and a stream.

mod client;
mod pool;
mod relay;
mod server;

use std::time::Duration;

pub use client::{Upstream, connect, relay_app};
pub use pool::Pool;
pub use server::{StreamTarget, TunnelCaller, serve};

use crate::datapath::DataPath;

/// Streams one tunnel carries at once; the server says so in its SETTINGS, and the client
/// opens another tunnel to the same destination past it.
pub const MAX_CONCURRENT_STREAMS: u32 = 512;
/// A CONNECT request is a method and an authority: anything larger is not one.
pub const MAX_HEADER_LIST_SIZE: u32 = 4 * 1024;
/// Receive window per stream: what one app connection may have in flight before its reader
/// catches up. Large enough for bulk transfers on a fast link, bounded for memory.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Receive window of a whole tunnel (all its streams together).
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Bytes h2 buffers for sending per stream before asking the relay to wait.
pub const MAX_SEND_BUFFER: usize = 256 * 1024;
/// A tunnel without streams for this long is closed.
pub const IDLE_TUNNEL: Duration = Duration::from_secs(60);
/// How long a destination whose proxy answered without the tunnel ALPN is called without
/// trying tunnels again (an older proxy during an upgrade).
pub const TUNNEL_LESS_FOR: Duration = Duration::from_secs(300);
/// Destination keys the pool holds at most; past it, idle ones are dropped.
pub const MAX_POOL_KEYS: usize = 1024;

/// What a tunnel's handshake was verified under: the own certificate install and the trust
/// bundle. A tunnel serves new streams only while both are unchanged, so a rotation is seen
/// by the next app connection exactly as a new TLS connection would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    own: u64,
    bundle: u64,
}

impl Generations {
    pub fn now(dp: &DataPath) -> Self {
        Generations {
            own: dp.store.generation(),
            bundle: dp.bundle.generation(),
        }
    }
}

/// The leaf's `notAfter` in Unix seconds; `None` when it cannot be read (treated as expired).
pub fn leaf_not_after(der: &[u8]) -> Option<i64> {
    palisade_ca_api::cert::serial_and_validity(der)
        .ok()
        .map(|(_, _, not_after)| not_after.unix_timestamp())
}

/// Whether a tunnel made under `made` and valid until `until` (Unix seconds) may carry a new
/// stream now. Pure.
pub fn still_fresh(made: Generations, now_gens: Generations, until: i64, now: i64) -> bool {
    made == now_gens && now < until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_is_fresh_only_under_its_generations_and_before_expiry() {
        let g = Generations { own: 1, bundle: 4 };
        assert!(still_fresh(g, g, 100, 99));
        assert!(!still_fresh(g, g, 100, 100), "expiry is exclusive");
        let renewed = Generations { own: 2, bundle: 4 };
        assert!(!still_fresh(g, renewed, 100, 0));
        let rotated = Generations { own: 1, bundle: 5 };
        assert!(!still_fresh(g, rotated, 100, 0));
    }
}
