//! One proxy of the storm asking for its first certificate, as `palisade-proxy` does: its own
//! connection (TCP, TLS 1.3 verifying the CA's chain against the mesh roots, HTTP/2), the steps
//! of `palisade_ca_api::client::CaClient` with its 10 s bounds (`PALISADE_CA_TIMEOUT`), and on
//! any failure the proxy's retry schedule (`palisade_proxy::identity::jittered_backoff` from 1 s, capped
//! at 60 s, as `palisade_proxy::run` sets it). What differs is only what a load client must do
//! to stand for 20,000 pods in one process: each proxy connects from an address of its own in
//! 127.0.0.0/8 (pods have their own IPs; the CA caps connections per source address), the
//! request is made before the storm, and a connection takes one of a bounded number of file
//! descriptors.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_ca_api::wire::{
    CertificateRequest, CertificateResponse, ErrorBody, PATH_CERTIFICATES, TOKEN_AUDIENCE,
};
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// The proxy's `PALISADE_CA_TIMEOUT` default: bound on connecting and on each request.
const CA_TIMEOUT: Duration = Duration::from_secs(10);
/// The proxy's certificate retry schedule (`palisade_proxy::run`).
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
const SERVER_NAME: &str = "palisade-ca.palisade-system.svc";

/// A proxy's request, made before anything is timed.
pub struct Proxy {
    source: IpAddr,
    authorization: HeaderValue,
    body: Bytes,
}

impl Proxy {
    /// Proxy `n`: its own key, CSR, token and source address.
    pub fn make(n: usize, issuer: &palisade_ca::auth::local::LocalIssuer) -> Proxy {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = palisade_testkit::pki::csr_pem(&key, vec![]);
        let token = issuer
            .mint(
                "storm",
                &format!("sa-{n}"),
                Some(&format!("pod-{n}")),
                TOKEN_AUDIENCE,
                Duration::from_secs(3600),
            )
            .unwrap();
        let mut authorization = HeaderValue::try_from(format!("Bearer {token}")).unwrap();
        authorization.set_sensitive(true);
        let body = serde_json::to_vec(&CertificateRequest {
            csr,
            ttl_seconds: None,
        })
        .unwrap();
        let n = n as u32 + 1;
        Proxy {
            source: IpAddr::V4(Ipv4Addr::new(
                127,
                1 + (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            )),
            authorization,
            body: Bytes::from(body),
        }
    }
}

/// What every proxy shares: where the CA is, the TLS client configuration (the proxy's: TLS
/// 1.3, the mesh roots, ALPN h2), and the file descriptors the process may still open.
pub struct Target {
    pub addr: SocketAddr,
    pub tls: TlsConnector,
    pub descriptors: Arc<Semaphore>,
}

/// A proxy's connection kept open after its certificate, as `CaClient` keeps it pooled: it holds
/// the CA's connection slot until the CA closes it for idleness.
pub type Kept = SendRequest<Full<Bytes>>;

pub struct Outcome {
    /// From the storm's release to the certificate, or `None` when the bound passed first.
    pub latency: Option<Duration>,
    /// Why each failed attempt failed, in order.
    pub failures: Vec<&'static str>,
    pub kept: Option<Kept>,
}

/// Asks until a certificate arrives or `bound` (from `released`) would pass before the next try.
pub async fn ask(proxy: &Proxy, target: &Target, released: Instant, bound: Duration) -> Outcome {
    let mut failures = Vec::new();
    let mut attempt = 0;
    loop {
        match once(proxy, target).await {
            Ok(kept) => {
                return Outcome {
                    latency: Some(released.elapsed()),
                    failures,
                    kept: Some(kept),
                };
            }
            Err(why) => failures.push(why),
        }
        let wait = palisade_proxy::identity::jittered_backoff(attempt, BACKOFF_BASE, BACKOFF_CAP);
        attempt += 1;
        if released.elapsed() + wait >= bound {
            return Outcome {
                latency: None,
                failures,
                kept: None,
            };
        }
        tokio::time::sleep(wait).await;
    }
}

async fn once(proxy: &Proxy, target: &Target) -> Result<Kept, &'static str> {
    let permit = target
        .descriptors
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| "closed")?;
    let mut sender = tokio::time::timeout(CA_TIMEOUT, connect(proxy, target, permit))
        .await
        .map_err(|_| "connect_timeout")??;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{SERVER_NAME}{PATH_CERTIFICATES}"))
        .header(header::AUTHORIZATION, proxy.authorization.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(proxy.body.clone()))
        .unwrap();
    let exchange = async {
        sender.ready().await.map_err(|_| "h2")?;
        let resp = sender.send_request(req).await.map_err(|_| "h2")?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|_| "h2")?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => e.error.code.as_str(),
                Err(_) => "bad_answer",
            });
        }
        let answer: CertificateResponse =
            serde_json::from_slice(&body).map_err(|_| "bad_answer")?;
        if answer.certificate_chain.is_empty() {
            return Err("bad_answer");
        }
        Ok(())
    };
    tokio::time::timeout(CA_TIMEOUT, exchange)
        .await
        .map_err(|_| "request_timeout")??;
    Ok(sender)
}

/// TCP from the proxy's own address, TLS, HTTP/2; the connection's task holds the descriptor.
async fn connect(
    proxy: &Proxy,
    target: &Target,
    permit: OwnedSemaphorePermit,
) -> Result<Kept, &'static str> {
    let socket = TcpSocket::new_v4().map_err(|_| "socket")?;
    socket
        .bind(SocketAddr::new(proxy.source, 0))
        .map_err(|_| "bind")?;
    let tcp = socket.connect(target.addr).await.map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    // A connection the CA refuses past its caps is closed before the handshake ends.
    let tls = target.tls.connect(name, tcp).await.map_err(|_| "tls")?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|_| "h2")?;
    tokio::spawn(async move {
        let _descriptor = permit;
        let _ = conn.await;
    });
    Ok(sender)
}
