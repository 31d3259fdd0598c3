//! The admin port: `/ready`, `/live`, `/metrics`. The routing is here; the bounded server is
//! `palisade_plumbing::admin_http`, shared with the injector and the proxy.

use std::sync::Arc;

use http::StatusCode;
use palisade_plumbing::admin_http::{self, AdminResponse};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::Ca;

pub async fn serve_admin(listener: TcpListener, ca: Arc<Ca>, shutdown: watch::Receiver<bool>) {
    let (limits, stats) = (ca.config.admin_limits, ca.metrics.admin_connections.clone());
    let route = move |req: http::Request<hyper::body::Incoming>, _peer| {
        let answer = answer(&ca, req.uri().path());
        async move { answer }
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
        "/metrics" => admin_http::metrics(
            ca.metrics
                .render(time::OffsetDateTime::now_utc().unix_timestamp()),
        ),
        _ => admin_http::text(StatusCode::NOT_FOUND, "try /ready, /live or /metrics\n"),
    }
}
