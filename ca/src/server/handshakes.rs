//! TLS handshakes in turn. A renewal storm admits thousands of connections at once; handshaken
//! all together, each one's share of the CPU shrinks until most miss the handshake timeout and
//! the work spent on them is lost. So at most `max_concurrent_handshakes` are in progress; the
//! rest wait for a turn, first come first served (tokio's `Semaphore` is fair).
//!
//! A turn covers the server's CPU step only: it is taken once the whole ClientHello has arrived
//! and given back at the server's first write (its flight: ServerHello to Finished, signed), so
//! a peer cannot hold one by sending slowly or not answering. What an unauthenticated peer can
//! hold stays bounded: the ClientHello must arrive within the handshake timeout of accept (no
//! turn is held meanwhile); a turn must come within the header-read timeout of accept (by then
//! the caller has likely given up too); and the handshake must end within the handshake timeout
//! of the turn. The queue is bounded by the connection cap: only admitted connections wait.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_ca_api::wire::{ErrorBody, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::config::ConnectionLimits;
use crate::metrics::Metrics;

/// The acceptor and the turns its handshakes take.
pub(super) struct Handshakes {
    acceptor: TlsAcceptor,
    turns: Arc<Semaphore>,
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
            turns: Arc::new(Semaphore::new(limits.max_concurrent_handshakes.max(1))),
            limits,
        }
    }

    /// Peeks at the first byte: TLS waits for its turn and is handshaken; plain HTTP gets a
    /// JSON 400 that says to use https; anything else is dropped.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        accepted_at: Instant,
        metrics: &Metrics,
    ) -> Result<TlsStream<Turned>, NotHandshaken> {
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
            metrics.refused(ErrorCode::TlsRequired.as_str());
            if first[0].is_ascii_uppercase() {
                reply_tls_required(tcp).await;
            }
            return Err(NotHandshaken::Refused);
        }
        let turn = Arc::new(Mutex::new(None));
        let io = Turned {
            tcp,
            turn: Some(turn.clone()),
        };
        let hello = tokio::time::timeout_at(
            accepted_at + limits.handshake_timeout,
            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io),
        )
        .await;
        let start = match hello {
            Ok(Ok(start)) => start,
            Ok(Err(error)) => {
                tracing::debug!(%error, "TLS handshake failed");
                return Err(NotHandshaken::Refused);
            }
            Err(_) => return Err(NotHandshaken::Bound("handshake_timeout")),
        };
        {
            let _waiting = Waiting::count(&metrics.api_handshakes_waiting);
            let deadline = accepted_at + limits.header_read_timeout;
            match tokio::time::timeout_at(deadline, self.turns.clone().acquire_owned()).await {
                Ok(Ok(permit)) => *lock(&turn) = Some(permit),
                Ok(Err(_closed)) => return Err(NotHandshaken::Refused),
                Err(_) => return Err(NotHandshaken::Bound("handshake_queue_timeout")),
            }
        }
        let config = self.acceptor.config().clone();
        let accepted =
            tokio::time::timeout(limits.handshake_timeout, start.into_stream(config)).await;
        // Given back at the first write already, unless the handshake failed before it.
        lock(&turn).take();
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's TCP stream, holding its handshake turn (once given) until the server first
/// writes: by then the server's CPU step is done, and what is left waits on the peer.
pub(super) struct Turned {
    tcp: TcpStream,
    /// `None` once the turn is given back.
    turn: Option<Arc<Mutex<Option<OwnedSemaphorePermit>>>>,
}

impl Turned {
    fn give_back_turn(&mut self) {
        if let Some(turn) = self.turn.take() {
            lock(&turn).take();
        }
    }
}

impl AsyncRead for Turned {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Turned {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.give_back_turn();
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.give_back_turn();
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    fn tls_pair() -> (TlsAcceptor, tokio_rustls::TlsConnector) {
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let provider = palisade_ca_api::tls::crypto_provider();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            TlsAcceptor::from(Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    /// A client that completes its side of the handshake if the server does, and the server's
    /// end of its connection.
    async fn client(connector: &tokio_rustls::TlsConnector) -> TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let connector = connector.clone();
        tokio::spawn(async move {
            let name = ServerName::try_from("ca.test").unwrap();
            let _ = connector.connect(name, tcp).await;
        });
        listener.accept().await.unwrap().0
    }

    #[tokio::test]
    async fn a_connection_waits_for_a_turn_at_most_the_header_read_timeout() {
        let (acceptor, connector) = tls_pair();
        let limits = ConnectionLimits {
            max_concurrent_handshakes: 1,
            header_read_timeout: Duration::from_millis(400),
            ..ConnectionLimits::default()
        };
        let handshakes = Handshakes::new(acceptor, limits);
        let metrics = Arc::new(Metrics::new(0));
        // The only turn, taken.
        let held = handshakes.turns.clone().try_acquire_owned().unwrap();
        let server = client(&connector).await;
        let accepted_at = Instant::now();
        let waiting = {
            let metrics = metrics.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                metrics.api_handshakes_waiting.load(Ordering::Relaxed)
            }
        };
        let (outcome, waiting) = tokio::join!(
            tokio::time::timeout(
                Duration::from_secs(5),
                handshakes.handshake(server, accepted_at, &metrics)
            ),
            waiting
        );
        let outcome = outcome.expect("a connection waited for its turn past the bound");
        assert!(matches!(
            outcome,
            Err(NotHandshaken::Bound("handshake_queue_timeout"))
        ));
        assert!(accepted_at.elapsed() >= limits.header_read_timeout);
        assert_eq!(waiting, 1, "the wait was not counted");
        assert_eq!(metrics.api_handshakes_waiting.load(Ordering::Relaxed), 0);
        // The turn back: the next one is handshaken, and gives its turn back when done.
        drop(held);
        let server = client(&connector).await;
        let done = handshakes.handshake(server, Instant::now(), &metrics).await;
        assert!(done.is_ok());
        assert_eq!(handshakes.turns.available_permits(), 1);
    }
}
