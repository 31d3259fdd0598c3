//! The API listener: peek at the first byte (plain HTTP gets a JSON 400 naming https), the TLS
//! handshake within a deadline, then HTTP/1.1 or HTTP/2 to the handlers, and a graceful drain on
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use palisade_ca_api::wire::{ErrorBody, ErrorCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::state::Ca;

/// A connection that has sent no TLS bytes by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve_api(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ca: Arc<Ca>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ca, builder) = (acceptor.clone(), ca.clone(), builder.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(tls) = handshake(tcp, &acceptor, &ca).await else {
                return;
            };
            let peer_chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.to_vec()));
            let service = service_fn(move |req| {
                let (ca, peer_chain) = (ca.clone(), peer_chain.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        crate::handlers::route(ca, peer_chain, req).await,
                    )
                }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer.ip = %peer.ip(), %error, "connection ended with an error");
            }
        });
    }
    let grace = ca.config.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
}

/// Peeks at the first byte: TLS goes on to the handshake; plain HTTP gets a JSON 400 that says
/// to use https; anything else is dropped.
async fn handshake(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    ca: &Ca,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None,
    }
    if first[0] != 0x16 {
        ca.metrics.refused(ErrorCode::TlsRequired.as_str());
        if first[0].is_ascii_uppercase() {
            reply_tls_required(tcp).await;
        }
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
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
