//! A CA started in-process on loopback, and raw HTTPS requests with any headers, body or client
//! certificate, for the API tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::config::ServeConfig;
use palisade_ca::server::{Running, start_with_kube_client};
use palisade_ca_api::client::{CaClient, CaClientConfig};
use palisade_ca_api::tls::crypto_provider;
use palisade_ca_api::wire::{CertificateRequest, CertificateResponse};
use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::pki::csr_pem;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

pub const CA_NAME: &str = "palisade-ca.palisade-system.svc";

pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub running: Running,
    pub roots: Arc<RootCertStore>,
    pub issuer: LocalIssuer,
}

impl TestCa {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start_in_with_kube(dir, None, tweak).await
    }

    /// A CA whose Kubernetes client is `kube_client` (a mock), e.g. for `--auth kube`.
    pub async fn start_with_kube(
        kube_client: kube::Client,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        Self::start_in_with_kube(tempfile::tempdir().unwrap(), Some(kube_client), tweak).await
    }

    async fn start_in_with_kube(
        dir: tempfile::TempDir,
        kube_client: Option<kube::Client>,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        palisade_ca_api::tls::install_default_provider();
        let mesh = dir.path().join("mesh.yaml");
        if !mesh.exists() {
            std::fs::write(&mesh, MeshFile::web_and_api().to_yaml()).unwrap();
        }
        let mut config = ServeConfig::embedded(dir.path().join("state"), mesh);
        tweak(&mut config);
        let running = start_with_kube_client(config, kube_client)
            .await
            .expect("CA starts");
        let roots = Arc::new(
            palisade_ca_api::tls::root_store(running.ca.rotation.authority().roots()).unwrap(),
        );
        let issuer = LocalIssuer::load_or_create(&dir.path().join("state")).unwrap();
        TestCa {
            dir,
            running,
            roots,
            issuer,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.api_addr
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.issuer
            .mint(
                ns,
                sa,
                Some("pod-1"),
                "palisade-ca",
                Duration::from_secs(600),
            )
            .unwrap()
    }

    pub fn client(
        &self,
        client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> CaClient {
        CaClient::new(CaClientConfig {
            addr: self.addr().to_string(),
            server_name: CA_NAME.into(),
            roots: self.roots.clone(),
            client_cert,
            timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    /// A fresh P-256 key and its certificate for `ns/sa`, issued through the API.
    pub async fn identity(&self, ns: &str, sa: &str) -> (rcgen::KeyPair, CertificateResponse) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = csr_pem(&key, vec![]);
        let resp = self
            .client(None)
            .request_certificate(
                &self.token(ns, sa),
                &CertificateRequest {
                    csr,
                    ttl_seconds: None,
                },
            )
            .await
            .expect("certificate issued");
        (key, resp)
    }
}

pub fn chain_ders(resp: &CertificateResponse) -> Vec<CertificateDer<'static>> {
    resp.certificate_chain
        .iter()
        .flat_map(|pem| palisade_ca_api::cert::parse_pem_certs(pem).unwrap())
        .collect()
}

pub struct RawResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl RawResponse {
    pub fn error_code(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body));
        v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code: {}", self.body))
            .to_owned()
    }
}

/// A TLS client config trusting `roots`, presenting `client` if given, offering `alpn`.
pub fn tls_config(
    roots: Arc<RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, rcgen::KeyPair)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the CA offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tls_over(tcp, config).await
}

/// A TCP connection to `addr` from `source` (an address of 127.0.0.0/8), port chosen by the
/// kernel.
pub async fn connect_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// TLS to the CA over `tcp`.
pub async fn tls_over(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(CA_NAME).unwrap(), tcp)
        .await
        .unwrap()
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", CA_NAME);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body))).unwrap()
}

/// `POST /v1/certificates` over HTTP/1.1 with `body`, and the bearer `token` when given.
pub async fn post_certificate(ca: &TestCa, token: Option<&str>, body: Vec<u8>) -> RawResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "POST",
        "/v1/certificates",
        &headers,
        body,
    )
    .await
}

/// One HTTP/1.1 request over TLS, optionally presenting `client` (chain, key).
pub async fn raw(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, rcgen::KeyPair)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> RawResponse {
    let tls = tls_connect(addr, tls_config(roots, client, &[])).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(request(method, path, headers, body))
        .await
        .unwrap();
    read_response(resp).await
}

/// An HTTP/2 connection to the CA from `source`, for many requests at once.
pub async fn h2_sender(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    source: &str,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = connect_from(source, addr).await;
    let tls = tls_over(tcp, tls_config(roots, None, &[b"h2"])).await;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// POST /v1/certificates with `token` and `body` on an HTTP/2 connection.
pub async fn post_h2(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    token: &str,
    body: Vec<u8>,
) -> RawResponse {
    let auth = format!("Bearer {token}");
    let req = request(
        "POST",
        &format!("https://{CA_NAME}/v1/certificates"),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body,
    );
    let resp = sender.send_request(req).await.expect("an answer");
    read_response(resp).await
}

/// One HTTP/2 request over TLS (ALPN h2); `Err` when the server answers with a stream or
/// connection error instead of a response.
pub async fn raw_h2(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<RawResponse, hyper::Error> {
    let tls = tls_connect(addr, tls_config(roots, None, &[b"h2"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(request(
            method,
            &format!("https://{CA_NAME}{path}"),
            headers,
            body,
        ))
        .await?;
    Ok(read_response(resp).await)
}

async fn read_response(resp: http::Response<hyper::body::Incoming>) -> RawResponse {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    // A stream (a watch that was wrongly accepted) must fail the test, not hang it.
    let body = match tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await
    {
        Ok(collected) => collected.map(|b| b.to_bytes()).unwrap_or_default(),
        Err(_) => Bytes::from_static(b"<answer still streaming after 5 s>"),
    };
    RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub struct CertResolver(pub std::sync::Arc<rustls::sign::CertifiedKey>);

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A CA client presenting a mesh certificate of `ns/sa`, as a proxy's watch does.
pub async fn mesh_client(ca: &TestCa, ns: &str, sa: &str) -> palisade_ca_api::client::CaClient {
    let (key, resp) = ca.identity(ns, sa).await;
    let signing = palisade_ca_api::tls::crypto_provider()
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
    let ck = rustls::sign::CertifiedKey::new(chain_ders(&resp), signing);
    ca.client(Some(std::sync::Arc::new(CertResolver(
        std::sync::Arc::new(ck),
    ))))
}

/// An operator's root: a self-signed CA certificate and its key, as PEM files in `dir`.
pub fn operator_root(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    operator_root_with(dir, name, |_| {})
}

/// [`operator_root`], with the certificate's parameters changed by `tweak` first.
pub fn operator_root_with(
    dir: &std::path::Path,
    name: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("Operator root {name}"));
    tweak(&mut params);
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// An operator's intermediate signed by the root in `root` (certificate and key files, as
/// [`operator_root`] makes them), valid from a day ago for 90 days, as PEM files in `dir`: its
/// certificate, its key, and the chain above it (the root alone).
pub fn operator_intermediate(
    dir: &std::path::Path,
    name: &str,
    root: &(std::path::PathBuf, std::path::PathBuf),
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    operator_intermediate_with(dir, name, root, |_| {})
}

/// [`operator_intermediate`], with the certificate's parameters changed by `tweak` first.
pub fn operator_intermediate_with(
    dir: &std::path::Path,
    name: &str,
    root: &(std::path::PathBuf, std::path::PathBuf),
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let root_pem = std::fs::read_to_string(&root.0).unwrap();
    let root_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&root.1).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Operator intermediate {name}"),
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(90);
    tweak(&mut params);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k, chain) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
        dir.join(format!("{name}-chain.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&chain, root_pem).unwrap();
    (c, k, chain)
}
