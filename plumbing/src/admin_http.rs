//! The bounded plain-HTTP/1.1 server behind every admin port (`/ready`, `/live`, `/metrics`, and
//! the proxy's own paths). The caller supplies the routing; this module supplies the bounds,
//! so that a flood of idle or slow connections cannot exhaust the process nor starve a probe:
//!
//! - at most [`Limits::max_connections`] connections at once, and
//!   [`Limits::max_connections_per_source`] from one address; a connection past either cap is
//!   closed at once (the accept loop never waits for a free place);
//! - a request's headers must arrive within [`Limits::header_read_timeout`] (this also closes
//!   a kept-alive connection that stays idle that long);
//! - a connection lives at most [`Limits::connection_deadline`];
//! - accept errors (fd exhaustion, say) back off, doubling up to a second, instead of spinning.
//!
//! Each bound that bites is counted in a [`ConnectionStats`] and logged at most every 10 s.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::conn_gate::{ConnectionGate, ConnectionStats};
use crate::until_true;

/// A response of an admin endpoint.
pub type AdminResponse = Response<Full<Bytes>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub header_read_timeout: Duration,
    pub connection_deadline: Duration,
}

impl Default for Limits {
    /// An admin port answers a handful of probes and scrapers.
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_connections_per_source: 16,
            header_read_timeout: Duration::from_secs(10),
            connection_deadline: Duration::from_secs(30),
        }
    }
}

/// Serves `route` on `listener` within `limits` until `stop` turns true; then closes every
/// open connection.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    route: F,
    stop: watch::Receiver<bool>,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = AdminResponse> + Send + 'static,
{
    let stats = Arc::new(ConnectionStats::new("admin"));
    serve_counted(listener, limits, stats, route, stop).await;
}

/// [`serve`], counting what its bounds do in `stats` (for the owner's `/metrics`).
pub async fn serve_counted<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<ConnectionStats>,
    route: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = AdminResponse> + Send + 'static,
{
    let gate = ConnectionGate::new(limits.max_connections, limits.max_connections_per_source);
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.reset();
                    accepted
                }
                Err(e) => {
                    let pause = backoff.next();
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "admin accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = until_true(&mut stop) => break,
                    }
                }
            },
            _ = until_true(&mut stop) => break,
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(why) => {
                stats.refused(why, peer.ip());
                drop(stream);
                continue;
            }
        };
        let (route, stats) = (route.clone(), stats.clone());
        let open = stats.track();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = route(req, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_deadline, connection).await {
                Ok(Err(e)) if e.is_timeout() => stats.closed_by("header_timeout", peer.ip()),
                Ok(_) => {}
                Err(_) => stats.closed_by("connection_deadline", peer.ip()),
            }
            drop((open, permit));
        });
    }
    connections.shutdown().await;
}

/// Doubling pauses after consecutive accept errors: 5 ms up to 1 s.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    fn next(&mut self) -> Duration {
        let pause = Duration::from_millis(5 << self.failures.min(8)).min(Duration::from_secs(1));
        self.failures = self.failures.saturating_add(1);
        pause
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> AdminResponse {
    respond(status, "text/plain; charset=utf-8", body.into())
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> AdminResponse {
    respond(status, "application/json", value.to_string())
}

/// A Prometheus text exposition.
pub fn metrics(body: String) -> AdminResponse {
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        limits: Limits,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let route = |req: Request<Incoming>, _peer: SocketAddr| async move {
            text(StatusCode::OK, format!("{}\n", req.uri().path()))
        };
        let task = tokio::spawn(serve(listener, limits, route, stop_rx));
        (addr, stop_tx, task)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Resolves once the server has closed `stream` (bounded by the guard).
    async fn closed_by_server(mut stream: tokio::net::TcpStream) -> bool {
        let mut buf = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn connect_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn connections_beyond_the_caps_are_refused_and_others_still_served() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_source: 2,
            ..Limits::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(ConnectionStats::new("admin"));
        let route = |req: Request<Incoming>, _peer: SocketAddr| async move {
            text(StatusCode::OK, format!("{}\n", req.uri().path()))
        };
        let task = tokio::spawn(serve_counted(
            listener,
            limits,
            stats.clone(),
            route,
            stop_rx,
        ));
        // Two idle connections from one source fill its share; a third from it is closed at once.
        let idle_a = connect_from("127.0.0.2", addr).await;
        let _idle_b = connect_from("127.0.0.2", addr).await;
        let third = connect_from("127.0.0.2", addr).await;
        assert!(
            closed_by_server(third).await,
            "a third connection from one source was kept"
        );
        // Another source is still served, up to the total cap.
        let answer = get(addr, "/ready").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _idle_c = connect_from("127.0.0.3", addr).await;
        let over_total = connect_from("127.0.0.4", addr).await;
        assert!(
            closed_by_server(over_total).await,
            "a connection past the total cap was kept"
        );
        assert_eq!(stats.refused_count(crate::conn_gate::Refusal::SourceCap), 1);
        assert_eq!(stats.refused_count(crate::conn_gate::Refusal::TotalCap), 1);
        drop(idle_a);
        let mut served = false;
        for _ in 0..50 {
            let mut s = connect_from("127.0.0.4", addr).await;
            let request = "GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            if s.write_all(request.as_bytes()).await.is_ok() {
                let mut out = String::new();
                let _ = s.read_to_string(&mut out).await;
                if out.starts_with("HTTP/1.1 200") {
                    served = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "a freed place was not taken again");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_never_sends_its_headers_is_closed() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, stop, task) = start(limits).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET /ready HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "the server kept a connection open without its headers"
        );
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn accept_backoff_doubles_to_a_second() {
        let mut b = AcceptBackoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(pauses[..4], [5, 10, 20, 40]);
        assert_eq!(*pauses.last().unwrap(), 1000);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(5));
    }
}
