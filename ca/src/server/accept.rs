//! The API listener: admission within the connection caps, the first byte peeked (plain HTTP
//! gets a JSON 400 naming https), the TLS handshake in turn within its deadlines
//! ([`super::handshakes`]), then HTTP/1.1 or HTTP/2 to the handlers under the header, idle and HTTP/2 bounds, and a graceful drain on shutdown.
//! Every bound that bites is counted (`palisade_ca_api_connections_*`) and logged at most every
//! 10 s.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use palisade_plumbing::conn_gate::{ConnectionGate, ConnectionPermit};
use palisade_plumbing::until_true;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::handshakes::{Handshakes, NotHandshaken};
use super::pressure::Pressure;
use crate::config::ConnectionLimits;
use crate::handlers::Body;
use crate::state::Ca;

/// How long a connection closed for idleness may take to say goodbye (a GOAWAY, a TLS
/// close_notify) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn serve_api(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ca: Arc<Ca>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = ca.config.connections;
    let gate = ConnectionGate::new(limits.max_connections, limits.max_connections_per_source);
    let pressure = Arc::new(Pressure::new(limits.max_connections));
    let builder = Arc::new(http_builder(&limits));
    let handshakes = Arc::new(Handshakes::new(acceptor, limits));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = until_true(&mut shutdown) => break,
        };
        let admitted = gate.admit(peer.ip());
        pressure.update(gate.open());
        let permit = match admitted {
            Ok(permit) => permit,
            Err(why) => {
                ca.metrics.api_connections.refused(why, peer.ip());
                drop(tcp);
                continue;
            }
        };
        let accepted_at = Instant::now();
        let _ = tcp.set_nodelay(true);
        let (gate, pressure) = (gate.clone(), pressure.clone());
        let connection = serve_connection(
            tcp,
            peer,
            (permit, accepted_at),
            handshakes.clone(),
            ca.clone(),
            builder.clone(),
            Signals {
                near_cap: pressure.subscribe(),
                shutdown: shutdown.clone(),
            },
        );
        connections.spawn(async move {
            connection.await;
            // The permit is back: the count may have fallen below the low mark.
            pressure.update(gate.open());
        });
    }
    let grace = ca.config.shutdown_grace;
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
    connections.shutdown().await;
}

fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    builder
}

/// What a connection listens to besides its peer: the CA shutting down, and the port nearing its
/// cap ([`Pressure`]).
struct Signals {
    near_cap: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    (permit, accepted_at): (ConnectionPermit, Instant),
    handshakes: Arc<Handshakes>,
    ca: Arc<Ca>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    signals: Signals,
) {
    let Signals {
        mut near_cap,
        mut shutdown,
    } = signals;
    let _open = (ca.metrics.api_connections.track(), permit);
    let limits = ca.config.connections;
    let stats = ca.metrics.api_connections.clone();
    let tls = match handshakes.handshake(tcp, accepted_at, &ca.metrics).await {
        Ok(tls) => tls,
        Err(NotHandshaken::Refused) => return,
        Err(NotHandshaken::Bound(bound)) => {
            stats.closed_by(bound, peer.ip());
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let peer_chain = session.peer_certificates().map(|c| Arc::new(c.to_vec()));
    let activity = Arc::new(Activity::new());
    let requests = activity.clone();
    let service = service_fn(move |req| {
        let (ca, peer_chain, in_flight) = (ca.clone(), peer_chain.clone(), requests.begin());
        async move {
            let response = crate::handlers::route(ca, peer.ip(), peer_chain, req).await;
            Ok::<_, std::convert::Infallible>(
                response.map(|body| InFlightBody::new(body, in_flight)),
            )
        }
    });
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // Set once the connection is being closed: by shutdown (no deadline here; the accept loop
    // bounds the drain) or for idleness (a short one).
    let mut closing: Option<Option<Instant>> = None;
    let result = loop {
        let shed = *near_cap.borrow_and_update();
        let idle = activity.idle_deadline(&limits, shed);
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = until_true(&mut shutdown), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(None);
            }
            _ = sleep_until(idle.map(|(at, _)| at)), if closing.is_none() => {
                if let Some((at, bound)) = activity.idle_deadline(&limits, shed)
                    && at <= Instant::now()
                {
                    stats.closed_by(bound, peer.ip());
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Some(Instant::now() + CLOSE_GRACE));
                }
            }
            // Either can move the idle deadline: look again.
            _ = activity.idled.notified(), if closing.is_none() => {}
            _ = near_cap.changed(), if closing.is_none() => {}
            _ = sleep_until(closing.flatten()), if closing.flatten().is_some() => return,
        }
    };
    if let Err(error) = result {
        if let Some(bound) = bound_that_bit(error.as_ref(), h2) {
            stats.closed_by(bound, peer.ip());
        } else {
            tracing::debug!(peer.ip = %peer.ip(), %error, "connection ended with an error");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which bound ended a connection with `error`, if one did: hyper's header-read timeout
/// (HTTP/1.1), the keep-alive timeout (HTTP/2), or an HTTP/2 limit the peer broke (too many
/// streams reset, a header list too large, a protocol error), which h2 answers with a GOAWAY.
fn bound_that_bit(error: &(dyn std::error::Error + 'static), h2: bool) -> Option<&'static str> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(hyper_error) = e.downcast_ref::<hyper::Error>()
            && hyper_error.is_timeout()
        {
            return Some(if h2 {
                "keepalive_timeout"
            } else {
                "header_timeout"
            });
        }
        if let Some(h2_error) = e.downcast_ref::<h2::Error>()
            && h2_error.is_go_away()
            && !h2_error.is_remote()
            && h2_error.reason() != Some(h2::Reason::NO_ERROR)
        {
            return Some("h2_protocol_error");
        }
        source = e.source();
    }
    None
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Activity {
    state: Mutex<ActivityState>,
    /// Woken when the last request in flight ends, so that the idle deadline is looked at
    /// again.
    idled: tokio::sync::Notify,
}

struct ActivityState {
    in_flight: usize,
    idle_since: Instant,
    requests: u64,
}

/// A request in flight: from its arrival until its response body is sent or dropped.
struct InFlight(Arc<Activity>);

/// A response body that keeps its request counted as in flight until it is sent or dropped,
/// so that a long mesh watch is never taken for an idle connection.
struct InFlightBody {
    body: Body,
    _in_flight: InFlight,
}

impl InFlightBody {
    fn new(body: Body, in_flight: InFlight) -> Self {
        InFlightBody {
            body,
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
                requests: 0,
            }),
            idled: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.in_flight += 1;
        state.requests += 1;
        InFlight(self.clone())
    }

    /// When the connection is to be closed if nothing happens, and which bound that is: the
    /// header-read timeout for a connection that has sent no request yet, the idle timeout
    /// after, or at once when the port is near its cap (`shed`, [`Pressure`]); `None` while a
    /// request is in flight.
    fn idle_deadline(
        &self,
        limits: &ConnectionLimits,
        shed: bool,
    ) -> Option<(Instant, &'static str)> {
        let state = self.state();
        if state.in_flight > 0 {
            return None;
        }
        Some(if state.requests == 0 {
            (
                state.idle_since + limits.header_read_timeout,
                "header_timeout",
            )
        } else if shed {
            (state.idle_since, "idle_near_cap")
        } else {
            (state.idle_since + limits.idle_timeout, "idle_timeout")
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
            self.0.idled.notify_one();
        }
    }
}
