//! TLS handshakes in turn. A renewal storm admits thousands of connections at once; handshaken
//! all together, each one's share of the CPU shrinks until most miss the handshake timeout and
//! the work spent on them is lost. So at most `max_concurrent_handshakes` are in progress; the
//! rest wait for a turn, first come first served (tokio's `Semaphore` is fair).
//!
//! What an unauthenticated peer can hold stays bounded: the first byte must arrive within the
//! handshake timeout of accept (no turn is taken for it: a silent peer costs no CPU); a turn
//! must come within the header-read timeout of accept (by then the caller has likely given up
//! too); and a turn is held for at most the handshake timeout, so a slow or stalled client
//! delays the others by no more than that. The queue itself is bounded by the connection cap:
//! only admitted connections wait.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use palisade_ca_api::wire::{ErrorBody, ErrorCode};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::ConnectionLimits;
use crate::state::Ca;

/// The acceptor and the turns its handshakes take.
pub(super) struct Handshakes {
    acceptor: TlsAcceptor,
    turns: Semaphore,
    limits: ConnectionLimits,
}

/// How a connection's handshake ended, when it did not give a TLS stream.
pub(super) enum NotHandshaken {
    /// Not TLS, or the handshake failed: nothing to count as a bound.
    Refused,
    /// A bound bit; its name for `palisade_ca_api_connections_closed_total`.
    Bound(&'static str),
}

impl Handshakes {
    pub fn new(acceptor: TlsAcceptor, limits: ConnectionLimits) -> Self {
        Handshakes {
            acceptor,
            turns: Semaphore::new(limits.max_concurrent_handshakes.max(1)),
            limits,
        }
    }

    /// Peeks at the first byte: TLS waits for its turn and is handshaken; plain HTTP gets a
    /// JSON 400 that says to use https; anything else is dropped.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        accepted_at: Instant,
        ca: &Ca,
    ) -> Result<TlsStream<TcpStream>, NotHandshaken> {
        let limits = &self.limits;
        let mut first = [0u8; 1];
        let peeked =
            tokio::time::timeout_at(accepted_at + limits.handshake_timeout, tcp.peek(&mut first))
                .await;
        match peeked {
            Ok(Ok(1)) => {}
            Ok(_) => return Err(NotHandshaken::Refused),
            Err(_) => return Err(NotHandshaken::Bound("handshake_timeout")),
        }
        if first[0] != 0x16 {
            ca.metrics.refused(ErrorCode::TlsRequired.as_str());
            if first[0].is_ascii_uppercase() {
                reply_tls_required(tcp).await;
            }
            return Err(NotHandshaken::Refused);
        }
        let turn = {
            let _waiting = Waiting::count(&ca.metrics.api_handshakes_waiting);
            let deadline = accepted_at + limits.header_read_timeout;
            match tokio::time::timeout_at(deadline, self.turns.acquire()).await {
                Ok(Ok(turn)) => turn,
                Ok(Err(_closed)) => return Err(NotHandshaken::Refused),
                Err(_) => return Err(NotHandshaken::Bound("handshake_queue_timeout")),
            }
        };
        let accepted =
            tokio::time::timeout(limits.handshake_timeout, self.acceptor.accept(tcp)).await;
        drop(turn);
        match accepted {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => {
                tracing::debug!(%error, "TLS handshake failed");
                Err(NotHandshaken::Refused)
            }
            Err(_) => Err(NotHandshaken::Bound("handshake_timeout")),
        }
    }
}

/// One connection counted in `palisade_ca_api_handshakes_waiting` while it lives.
struct Waiting<'a>(&'a AtomicI64);

impl<'a> Waiting<'a> {
    fn count(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handshakes in progress at once by default: enough to keep every core busy while some wait on
/// the network, few enough that each finishes quickly.
pub fn default_concurrency() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn reply_tls_required(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::to_string(&ErrorBody::new(
        ErrorCode::TlsRequired,
        "this port speaks HTTPS (TLS 1.3) only: use https:// and trust the mesh root from GET /v1/trust-bundle or `palisade-ca bundle`",
    ))
    .expect("serializes");
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(resp.as_bytes())).await;
    let _ = tcp.shutdown().await;
}
