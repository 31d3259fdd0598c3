//! `/app-health/<container>/<probe>`: the kubelet's original probes, checked on its behalf.
//!
//! The injector rewrites each HTTP, TCP and gRPC probe to the proxy's admin port and records
//! the original in the pod annotation `palisade.dev/app-probes`, a JSON object keyed by
//! `<container>/<livez|readyz|startupz>`; the proxy reads it from `PALISADE_APP_PROBES` (the
//! downward API maps the annotation to it). Checks go to the app on 127.0.0.1 with the
//! kubelet's rules: HTTP status 200..399 passes, a TCP connect passes, gRPC `SERVING` passes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use palisade_ca_api::contract::{AppProbe, Grpc, HttpGet};
pub use palisade_ca_api::contract::{AppProbes, parse_probes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The result of one check: pass or fail with what went wrong.
pub type ProbeResult = Result<String, String>;

/// Runs `probe` against the app on loopback within `timeout`.
pub async fn check(probe: &AppProbe, timeout: Duration) -> ProbeResult {
    match tokio::time::timeout(timeout, check_inner(probe)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Connects to `host:port`, or to the app on loopback when no host is given.
async fn connect(host: Option<&str>, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    match host.filter(|h| !h.is_empty()) {
        Some(h) => tokio::net::TcpStream::connect((h, port)).await,
        None => tokio::net::TcpStream::connect(local(port)).await,
    }
}

async fn check_inner(probe: &AppProbe) -> ProbeResult {
    match probe {
        AppProbe::TcpSocket(t) => connect(t.host.as_deref(), t.port)
            .await
            .map(|_| format!("tcp {} accepts", t.port))
            .map_err(|e| format!("tcp {}: {e}", t.port)),
        AppProbe::HttpGet(h) => {
            let tcp = connect(h.host.as_deref(), h.port)
                .await
                .map_err(|e| format!("http {}: {e}", h.port))?;
            if h.scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                let connector = tokio_rustls::TlsConnector::from(insecure_probe_config());
                let tls = connector
                    .connect(
                        rustls_pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
                        tcp,
                    )
                    .await
                    .map_err(|e| format!("https {}: {e}", h.port))?;
                http_get(tls, h).await
            } else {
                http_get(tcp, h).await
            }
        }
        AppProbe::Grpc(g) => grpc_check(g).await,
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, h: &HttpGet) -> ProbeResult {
    let path = h
        .path
        .as_deref()
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: kube-probe/palisade\r\nAccept: */*\r\nConnection: close\r\n",
        h.host
            .as_deref()
            .filter(|x| !x.is_empty())
            .unwrap_or("127.0.0.1"),
        h.port
    );
    for hd in &h.http_headers {
        if hd.name.contains(['\r', '\n', ':']) || hd.value.contains(['\r', '\n']) {
            return Err(format!("header {:?} is malformed", hd.name));
        }
        req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut head[n..]).await.map_err(|e| e.to_string())?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
    if (200..400).contains(&status) {
        Ok(format!("http {status}"))
    } else {
        Err(format!("http {status}"))
    }
}

async fn grpc_check(g: &Grpc) -> ProbeResult {
    let tcp = tokio::net::TcpStream::connect(local(g.port))
        .await
        .map_err(|e| format!("grpc {}: {e}", g.port))?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| format!("grpc {}: {e}", g.port))?;
    let driver = tokio::spawn(conn);
    // HealthCheckRequest { service = 1 }, length-prefixed.
    let service = g.service.clone().unwrap_or_default();
    let mut message = Vec::new();
    if !service.is_empty() && service.len() < 128 {
        message.push(0x0a);
        message.push(service.len() as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let req = http::Request::post(format!(
        "http://127.0.0.1:{}/grpc.health.v1.Health/Check",
        g.port
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(body)))
    .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let header_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or(header_status);
        if status.as_deref() != Some("0") {
            return Err(format!(
                "grpc status {}",
                status.unwrap_or_else(|| "missing".into())
            ));
        }
        let bytes = collected.to_bytes();
        // HealthCheckResponse { status = 1 (varint) }: SERVING is 1.
        if bytes.len() >= 7 && bytes[5] == 0x08 && bytes[6] == 1 {
            Ok("grpc SERVING".to_owned())
        } else {
            Err("grpc health is not SERVING".to_owned())
        }
    }
    .await;
    driver.abort();
    result
}

/// HTTPS probes, like the kubelet's, do not verify the app's certificate: the probe checks
/// liveness on loopback, not identity, and never carries mesh traffic.
fn insecure_probe_config() -> Arc<rustls::ClientConfig> {
    use palisade_ca_api::tls::handshake_signature;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct AnyCertificate;
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            handshake_signature::verify_tls12(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            handshake_signature::verify_tls13(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            handshake_signature::supported_schemes()
        }
    }
    let provider = palisade_ca_api::tls::crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    Arc::new(config)
}
