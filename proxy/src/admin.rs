//! The admin endpoint (`:15021`): readiness, liveness, metrics, identity, app health checks
//! on the kubelet's behalf, and `POST /shutdown` for loopback callers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use palisade_plumbing::admin_http::{self, AdminResponse, Limits, text};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::CertStore;
use crate::mesh::MeshView;
use crate::metrics::Metrics;
use crate::probes::{AppProbes, check};

/// What the admin endpoint reads and the one thing it can do (start the shutdown).
pub struct AdminState {
    pub store: Arc<CertStore>,
    /// The roots trusted now, for `/identity`.
    pub bundle: Arc<crate::tls::TrustBundle>,
    pub mesh: Arc<MeshView>,
    pub metrics: Arc<Metrics>,
    pub probes: AppProbes,
    pub probe_timeout: Duration,
    /// Set when the drain has begun: not ready from then on.
    pub draining: Arc<AtomicBool>,
    /// Starts the shutdown (as SIGTERM does).
    pub shutdown: watch::Sender<bool>,
    /// `/metrics` answers callers other than loopback.
    pub remote_metrics: bool,
    /// What `init` did about capture, appended to `/ready`'s answer.
    pub init_report: String,
}

/// Whether a caller at `peer` may use `path`. Loopback callers (the pod itself, `kubectl
/// exec`) may use everything; others — the kubelet, and anyone else who can reach the pod —
/// only what the kubelet needs: `/ready`, `/live` and `/app-health/...`, plus `/metrics` when
/// the pod opted in for a scraper. `/identity` and `/shutdown` never. Pure.
pub fn remote_allowed(peer: SocketAddr, path: &str, remote_metrics: bool) -> bool {
    peer.ip().is_loopback()
        || peer.ip().to_canonical().is_loopback()
        || matches!(path, "/ready" | "/live")
        || path.starts_with("/app-health/")
        || (remote_metrics && path == "/metrics")
}

/// The admin port's bounds: the kubelet sends its probe at once, so a caller that has not sent
/// its headers within a second is not one; over the caps new connections are refused (never
/// queued), so a flood cannot make the kubelet's probes wait.
pub fn limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        connection_deadline: Duration::from_secs(10),
        ..Limits::default()
    }
}

/// Why the proxy is not ready, if it is not. Pure.
pub fn readiness(cert_valid: bool, has_snapshot: bool, draining: bool) -> Result<(), &'static str> {
    if draining {
        Err("draining: shutting down")
    } else if !cert_valid {
        Err("no valid certificate (none issued yet, or the last one expired)")
    } else if !has_snapshot {
        Err("no mesh state from the control plane yet")
    } else {
        Ok(())
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> AdminResponse {
    admin_http::json(status, &value)
}

/// Answers one admin request.
pub async fn route(
    state: &AdminState,
    peer: SocketAddr,
    method: &Method,
    path: &str,
) -> AdminResponse {
    if !remote_allowed(peer, path, state.remote_metrics) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "{path} answers loopback callers only (kubectl exec into the pod){}\n",
                if path == "/metrics" {
                    "; for a scraper, annotate the pod palisade.dev/admin-remote-metrics: \"true\""
                } else {
                    ""
                }
            ),
        );
    }
    match (method, path) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let r = readiness(
                state.store.valid().is_some(),
                state.mesh.has_snapshot(),
                state.draining.load(Ordering::Acquire),
            );
            match r {
                Ok(()) => text(StatusCode::OK, format!("ready\n{}", state.init_report)),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
        }
        (&Method::GET, "/metrics") => admin_http::metrics(state.metrics.render()),
        (&Method::GET, "/identity") => match state.store.current() {
            Some(c) => json(
                StatusCode::OK,
                serde_json::json!({
                    "spiffe_id": c.spiffe_id.to_string(),
                    "serial": c.serial,
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                    "valid": state.store.valid().is_some(),
                    // Which intermediate signed the leaf, and which roots this proxy trusts:
                    // what an operator compares with `palisade-ca rotate status`.
                    "issuer_sha256": c.issuer,
                    "trusted_roots": state.bundle.fingerprints(),
                }),
            ),
            None => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "no certificate yet"}),
            ),
        },
        (&Method::POST, "/shutdown") => {
            if !peer.ip().is_loopback() {
                return text(
                    StatusCode::FORBIDDEN,
                    "shutdown is accepted from loopback callers only\n",
                );
            }
            tracing::info!("shutdown requested on the admin port");
            let _ = state.shutdown.send(true);
            text(StatusCode::OK, "shutting down\n")
        }
        (&Method::GET, p) if p.starts_with("/app-health/") => {
            let key = &p["/app-health/".len()..];
            match state.probes.get(key) {
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no probe recorded for {key:?} (see PALISADE_APP_PROBES)\n"),
                ),
                Some(probe) => match check(probe, state.probe_timeout).await {
                    Ok(msg) => text(StatusCode::OK, format!("{msg}\n")),
                    Err(msg) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{msg}\n")),
                },
            }
        }
        (_, "/live" | "/ready" | "/metrics" | "/identity" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /ready /live /metrics /identity /app-health/<container>/<probe> POST /shutdown\n",
        ),
    }
}

/// Serves the admin endpoint until `stop` turns true, within the shared admin bounds.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: watch::Receiver<bool>) {
    let route = move |req: Request<Incoming>, peer: SocketAddr| {
        let state = state.clone();
        async move { route(&state, peer, req.method(), req.uri().path()).await }
    };
    admin_http::serve(listener, limits(), route, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_a_certificate_a_snapshot_and_no_drain() {
        assert!(readiness(true, true, false).is_ok());
        assert!(
            readiness(false, true, false)
                .unwrap_err()
                .contains("certificate")
        );
        assert!(
            readiness(true, false, false)
                .unwrap_err()
                .contains("mesh state")
        );
        assert!(
            readiness(true, true, true)
                .unwrap_err()
                .contains("draining")
        );
    }
}
