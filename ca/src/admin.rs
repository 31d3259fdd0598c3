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
                return start_rotation(&ca, req, peer).await;
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
/// The body `POST /rotation/root` and `/rotation/intermediate` may carry: an operator's root
/// (`from_cert`, `from_key`), or an operator's intermediate with the chain above it (and
/// `from_chain`), as files the CA reads (the key never crosses the admin port).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorFiles {
    from_cert: std::path::PathBuf,
    from_key: std::path::PathBuf,
    #[serde(default)]
    from_chain: Option<std::path::PathBuf>,
}

/// The longest body a rotation request may have.
const MAX_ROTATION_BODY: usize = 4096;

async fn start_rotation(
    ca: &Ca,
    req: http::Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> AdminResponse {
    let path = req.uri().path().to_owned();
    let kind = match path.as_str() {
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
    let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
        req.into_body(),
        MAX_ROTATION_BODY,
    ))
    .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return admin_http::text(
                StatusCode::BAD_REQUEST,
                format!("the body is unreadable or over {MAX_ROTATION_BODY} bytes\n"),
            );
        }
    };
    let files = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<OperatorFiles>(&body) {
            Ok(files) if kind.is_some() => Some(files),
            Ok(_) => {
                return admin_http::text(
                    StatusCode::BAD_REQUEST,
                    "abandoning a rotation takes no body\n",
                );
            }
            Err(e) => {
                return admin_http::text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the body must be {{\"from_cert\": PATH, \"from_key\": PATH}} for a root, with \"from_chain\": PATH for an intermediate: {e}\n"
                    ),
                );
            }
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let started = match (kind, files) {
        (
            Some(Kind::Root),
            Some(OperatorFiles {
                from_cert,
                from_key,
                from_chain: None,
            }),
        ) => ca.rotation.begin_with_root(&from_cert, &from_key, now),
        (
            Some(Kind::Intermediate),
            Some(OperatorFiles {
                from_cert,
                from_key,
                from_chain: Some(chain),
            }),
        ) => ca
            .rotation
            .begin_with_intermediate(&from_cert, &from_key, &chain, now),
        (Some(Kind::Root), Some(_)) => {
            return admin_http::text(
                StatusCode::BAD_REQUEST,
                "a root rotation takes from_cert and from_key only; from_chain goes with POST /rotation/intermediate (an intermediate under an offline root)\n",
            );
        }
        (Some(Kind::Intermediate), Some(_)) => {
            return admin_http::text(
                StatusCode::BAD_REQUEST,
                "an operator's intermediate needs from_chain too: the certificates above it, the root last\n",
            );
        }
        (Some(kind), None) => ca.rotation.begin(kind, Trigger::Manual, now),
        (None, _) => ca.rotation.abort(),
    };
    match started {
        Ok(transition) => {
            ca.audit.rotation(&transition).await;
            rotation_status(ca, StatusCode::ACCEPTED)
        }
        Err(e) => {
            let status = refusal(&e);
            let text = if status == StatusCode::INTERNAL_SERVER_ERROR {
                format!("cannot start the rotation: {e}\n")
            } else {
                format!("{e}\n")
            };
            admin_http::text(status, text)
        }
    }
}

/// The status a refused `POST /rotation/*` is answered with. Pure.
fn refusal(e: &RotationError) -> StatusCode {
    use crate::keys::KeyError;
    match e {
        RotationError::Running { .. }
        | RotationError::TooLateToAbort(_)
        | RotationError::NothingToAbort
        // Another replica drives the rotation: ask the Lease's holder (named in the message).
        | RotationError::Keys(KeyError::NotDriver(_)) => StatusCode::CONFLICT,
        RotationError::Keys(KeyError::Write(..) | KeyError::Generate(_)) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        // The rest concern the operator's files, or a root whose key is not held.
        RotationError::Keys(_) | RotationError::SameRoot(_) => StatusCode::BAD_REQUEST,
        RotationError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_that_does_not_drive_answers_conflict_with_the_holder_named() {
        let e = RotationError::Keys(crate::keys::KeyError::NotDriver(
            "this CA replica (palisade-ca-1) does not drive the rotation: palisade-ca-0 holds Lease palisade-ca-rotation".into(),
        ));
        assert_eq!(refusal(&e), StatusCode::CONFLICT);
        assert!(e.to_string().contains("palisade-ca-0 holds Lease"), "{e}");
        assert_eq!(
            refusal(&RotationError::Keys(crate::keys::KeyError::Generate(
                "x".into()
            ))),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            refusal(&RotationError::NothingToAbort),
            StatusCode::CONFLICT
        );
        assert_eq!(
            refusal(&RotationError::Keys(crate::keys::KeyError::RootKeyOffline)),
            StatusCode::BAD_REQUEST
        );
    }
}
