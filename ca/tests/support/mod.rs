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
use palisade_ca::server::{Running, start};
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
        palisade_ca_api::tls::install_default_provider();
        let mesh = dir.path().join("mesh.yaml");
        if !mesh.exists() {
            std::fs::write(&mesh, MeshFile::web_and_api().to_yaml()).unwrap();
        }
        let mut config = ServeConfig::embedded(dir.path().join("state"), mesh);
        tweak(&mut config);
        let running = start(config).await.expect("CA starts");
        let roots =
            Arc::new(palisade_ca_api::tls::root_store(running.ca.authority.roots()).unwrap());
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
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(CA_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", CA_NAME);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    // A stream (a watch that was wrongly accepted) must fail the test, not hang it.
    let body = match tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await
    {
        Ok(collected) => collected.map(|b| b.to_bytes()).unwrap_or_default(),
        Err(_) => Bytes::from_static(b"<answer still streaming after 5 s>"),
    };
    RawResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}
