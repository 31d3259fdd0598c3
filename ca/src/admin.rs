//! The admin port: `/ready`, `/live`, `/metrics`, and the rotation (`GET /rotation`; `POST
//! /rotation/root` and `/rotation/intermediate` from loopback only). The routing is here; the
//! bounded server is `palisade_plumbing::admin_http`, shared with the injector and the proxy.

use std::sync::Arc;

use http::StatusCode;
use palisade_plumbing::admin_http::{self, AdminResponse};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::rotation::{Kind, RotationError, Trigger};
use crate::state::Ca;

pub async fn serve_admin(listener: TcpListener, ca: Arc<Ca>, shutdown: watch::Receiver<bool>) {
    let (limits, stats) = (ca.config.admin_limits, ca.metrics.admin_connections.clone());
    let route = move |req: http::Request<hyper::body::Incoming>, peer: std::net::SocketAddr| {
        let ca = ca.clone();
        async move {
            if req.method() == http::Method::POST {
                return start_rotation(&ca, req.uri().path(), peer).await;
            }
            answer(&ca, req.uri().path())
        }
    };
    admin_http::serve_counted(listener, limits, stats, route, shutdown).await;
}

fn answer(ca: &Ca, path: &str) -> AdminResponse {
    match path {
        "/live" => admin_http::text(StatusCode::OK, "live\n"),
        "/ready" if *ca.shutdown.borrow() => {
            admin_http::text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        "/ready" if !*ca.ready.borrow() => admin_http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first full sync of the Kubernetes watches (pods, namespaces, meshpolicies, services, endpointslices)\n",
        ),
        "/ready" => admin_http::text(StatusCode::OK, "ready\n"),
        "/rotation" => rotation_status(ca, StatusCode::OK),
        "/metrics" => admin_http::metrics(
            ca.metrics
                .render(time::OffsetDateTime::now_utc().unix_timestamp()),
        ),
        _ => admin_http::text(
            StatusCode::NOT_FOUND,
            "try /ready, /live, /metrics or /rotation\n",
        ),
    }
}

fn rotation_status(ca: &Ca, status: StatusCode) -> AdminResponse {
    let body = serde_json::to_value(ca.rotation.status()).expect("the status serializes");
    admin_http::json(status, &body)
}

/// `POST /rotation/root|intermediate`: starts a rotation, answered with the status (202), or
/// refused with why.
async fn start_rotation(ca: &Ca, path: &str, peer: std::net::SocketAddr) -> AdminResponse {
    let kind = match path {
        "/rotation/root" => Some(Kind::Root),
        "/rotation/intermediate" => Some(Kind::Intermediate),
        "/rotation/abort" => None,
        _ => {
            return admin_http::text(
                StatusCode::NOT_FOUND,
                "POST /rotation/root, /rotation/intermediate or /rotation/abort\n",
            );
        }
    };
    // An IPv4 caller of a `[::]` listener arrives as ::ffff:127.0.0.1.
    if !peer.ip().to_canonical().is_loopback() {
        return admin_http::text(
            StatusCode::FORBIDDEN,
            "rotations start from inside the CA's pod only: kubectl exec into it and run `palisade-ca rotate root|intermediate`\n",
        );
    }
    let started = match kind {
        Some(kind) => ca
            .rotation
            .begin(kind, Trigger::Manual, time::OffsetDateTime::now_utc()),
        None => ca.rotation.abort(),
    };
    match started {
        Ok(transition) => {
            ca.audit.rotation(&transition).await;
            rotation_status(ca, StatusCode::ACCEPTED)
        }
        Err(
            e @ (RotationError::Running { .. }
            | RotationError::TooLateToAbort(_)
            | RotationError::NothingToAbort),
        ) => admin_http::text(StatusCode::CONFLICT, format!("{e}\n")),
        Err(e @ RotationError::Unsupported(_)) => {
            admin_http::text(StatusCode::NOT_IMPLEMENTED, format!("{e}\n"))
        }
        Err(e) => admin_http::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot start the rotation: {e}\n"),
        ),
    }
}
