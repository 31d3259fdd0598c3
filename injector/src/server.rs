//! Sockets: the HTTPS webhook (`POST /mutate`) and the plain-HTTP admin port (`/ready`, `/live`,
//! `/metrics`). No deciding happens here: bodies go to `review::review` and back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use palisade_plumbing::admin_http::{self, AdminResponse};
use palisade_plumbing::conn_gate::ConnectionGate;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::review::{self, Verdict};
use crate::settings::InjectorSettings;
use crate::tls::{self, CertFiles, ReloadingResolver, TlsError};

/// Everything `serve` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub cert_files: CertFiles,
    pub settings: InjectorSettings,
    pub max_request_bytes: usize,
    pub tls_reload_interval: Duration,
    pub max_connections: usize,
    /// Most connections from one source address (the API server's replicas each have one).
    pub max_connections_per_source: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {0}: {1}; pick a free address with --listen/--admin-listen")]
    Bind(SocketAddr, #[source] std::io::Error),
}

struct State {
    settings: InjectorSettings,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
    ready: AtomicBool,
}

/// A running webhook: its real addresses, and the handle that stops it.
pub struct Bound {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub resolver: Arc<ReloadingResolver>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Bound {
    /// Stops accepting, ends open connections and waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until one of the servers stops (they stop only on shutdown).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }
}

/// Loads the certificate, binds both ports and starts serving.
pub async fn start(config: ServeConfig) -> Result<Bound, ServeError> {
    let key = tls::load(&config.cert_files)?;
    let resolver = Arc::new(ReloadingResolver::new(key));
    let tls_config = tls::server_config(resolver.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));

    let webhook = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServeError::Bind(config.listen, e))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| ServeError::Bind(config.admin_listen, e))?;
    let webhook_addr = webhook
        .local_addr()
        .map_err(|e| ServeError::Bind(config.listen, e))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| ServeError::Bind(config.admin_listen, e))?;

    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(State {
        settings: config.settings,
        metrics: metrics.clone(),
        max_request_bytes: config.max_request_bytes,
        ready: AtomicBool::new(false),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(tls::watch_files(
        config.cert_files,
        resolver.clone(),
        config.tls_reload_interval,
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    tasks.spawn(accept_webhook(
        webhook,
        acceptor,
        state.clone(),
        ConnectionGate::new(config.max_connections, config.max_connections_per_source),
        shutdown_rx.clone(),
    ));
    let admin_state = state.clone();
    tasks.spawn(admin_http::serve(
        admin,
        admin_http::Limits::default(),
        move |req, _peer| {
            let answer = handle_admin(&req, &admin_state);
            async move { answer }
        },
        shutdown_rx,
    ));
    state.ready.store(true, Ordering::Release);
    tracing::info!(%webhook_addr, %admin_addr, "palisade-injector serving");
    Ok(Bound {
        webhook_addr,
        admin_addr,
        resolver,
        metrics,
        shutdown,
        tasks,
    })
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    builder
}

async fn accept_webhook(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    gate: Arc<ConnectionGate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Over a cap the connection is closed at once: the accept loop never waits, so a
        // flood from one address cannot hold up the API server's reviews.
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(why) => {
                state.metrics.webhook_connections.refused(why, peer.ip());
                drop(stream);
                continue;
            }
        };
        let open = state.metrics.webhook_connections.track();
        let acceptor = acceptor.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("webhook", peer.ip = %peer.ip(), peer.port = peer.port());
        connections.spawn(
            async move {
                serve_webhook_connection(stream, peer, acceptor, state, shutdown).await;
                drop((permit, open));
            }
            .instrument(span),
        );
    }
    // Reviews in flight get a moment to finish (the API server would otherwise see a reset and
    // fail the pod's creation); connections still open after that are cut.
    let drain = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), drain).await;
    connections.shutdown().await;
}

/// How long open webhook connections may take to finish their requests on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn serve_webhook_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer.ip = %peer.ip(), error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer.ip = %peer.ip(), "TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle_webhook(req, &state).await) }
    });
    let builder = http_builder();
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.changed() => {
            // Finish the request in flight, then close; idle connections close at once.
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer.ip = %peer.ip(), error = %e, "webhook connection ended with an error");
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// `{"error": {"code": ..., "message": ...}}`, as the CA API answers errors.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    json_response(status, serde_json::to_vec(&body).unwrap_or_default())
}

async fn handle_webhook(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if let Some(refusal) = refuse_route(&req) {
        return refusal;
    }
    let started = Instant::now();
    match read_body(req, state).await {
        Ok(body) => answer_review(&body, state, started),
        Err(refusal) => refusal,
    }
}

/// Only `POST /mutate` is served: anything else gets its refusal.
fn refuse_route(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.uri().path() != "/mutate" {
        return Some(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no such path {:?}; palisade-injector serves POST /mutate",
                req.uri().path()
            ),
        ));
    }
    if req.method() != Method::POST {
        return Some(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!(
                "{} /mutate is not supported; send POST with an AdmissionReview",
                req.method()
            ),
        ));
    }
    None
}

/// The body, within `--max-request-bytes` (a larger declared or actual body gets 413).
async fn read_body(req: Request<Incoming>, state: &State) -> Result<Bytes, Response<Full<Bytes>>> {
    let too_large = || {
        state.metrics.record_rejected("body_too_large");
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!(
                "the AdmissionReview is larger than {} bytes; raise --max-request-bytes if pods \
                 this large are expected",
                state.max_request_bytes
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_request_bytes as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), state.max_request_bytes)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => {
            state.metrics.record_rejected("body_unreadable");
            Err(error_response(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                &format!("could not read the request body: {e}"),
            ))
        }
    }
}

/// Reviews the AdmissionReview, counts and logs the verdict, and answers it.
fn answer_review(body: &[u8], state: &State, started: Instant) -> Response<Full<Bytes>> {
    match review::review(body, &state.settings) {
        Ok(outcome) => {
            state.metrics.record(outcome.verdict);
            if let Some(d) = outcome.patch_build {
                state.metrics.patch_build.observe(d);
            }
            state.metrics.review_duration.observe(started.elapsed());
            match outcome.verdict {
                Verdict::Injected => tracing::info!(pod = %outcome.subject, "injected"),
                Verdict::Skipped(reason) => {
                    tracing::debug!(pod = %outcome.subject, reason = reason.as_str(), "skipped")
                }
                Verdict::Denied(reason) => tracing::warn!(
                    pod = %outcome.subject,
                    reason = reason.as_str(),
                    message = outcome.message.as_deref().unwrap_or_default(),
                    "denied"
                ),
            }
            json_response(StatusCode::OK, outcome.body)
        }
        Err(e) => {
            state.metrics.record_rejected(e.code());
            tracing::warn!(code = e.code(), error = %e, "malformed AdmissionReview");
            error_response(StatusCode::BAD_REQUEST, e.code(), &e.to_string())
        }
    }
}

fn handle_admin(req: &Request<Incoming>, state: &State) -> AdminResponse {
    if req.method() != Method::GET {
        return admin_http::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/live" => admin_http::text(StatusCode::OK, "live\n"),
        "/ready" if state.ready.load(Ordering::Acquire) => {
            admin_http::text(StatusCode::OK, "ready\n")
        }
        "/ready" => admin_http::text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        "/metrics" => admin_http::metrics(state.metrics.render()),
        other => admin_http::text(
            StatusCode::NOT_FOUND,
            format!("no such path {other:?}; the admin port serves /ready, /live and /metrics\n"),
        ),
    }
}
