//! The admin port: `/ready`, `/live`, `/metrics`. Plain HTTP/1.1, no deciding.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Ca;

pub async fn serve_admin(listener: TcpListener, ca: Arc<Ca>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let ca = ca.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let ca = ca.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&ca, req.uri().path())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn answer(ca: &Ca, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/live" => (StatusCode::OK, "live\n".to_owned()),
        "/ready" if *ca.shutdown.borrow() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        ),
        "/ready" if !*ca.ready.borrow() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first full sync of the Kubernetes watches (pods, namespaces, meshpolicies)\n"
                .to_owned(),
        ),
        "/ready" => (StatusCode::OK, "ready\n".to_owned()),
        "/metrics" => (
            StatusCode::OK,
            ca.metrics
                .render(time::OffsetDateTime::now_utc().unix_timestamp()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "try /ready, /live or /metrics\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header(
            http::header::CONTENT_TYPE,
            if path == "/metrics" {
                "text/plain; version=0.0.4"
            } else {
                "text/plain"
            },
        )
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
