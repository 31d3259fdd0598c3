//! Proxies on loopback with certificates minted per test, apps to put behind them, and TLS
//! clients that misbehave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade_ca_api::policy::{DefaultPolicy, InboundPolicy, ResolvedPolicy};
use palisade_ca_api::wire::Destination;
use palisade_proxy::app::{Bound, Parts, Settings, start};
use palisade_proxy::clock::Clock;
use palisade_proxy::datapath::Limits;
use palisade_proxy::identity::{CertStore, Installed};
use palisade_proxy::inbound::InboundTarget;
use palisade_proxy::mesh::{MeshConfig, MeshView};
use palisade_proxy::metrics::Metrics;
use palisade_proxy::outbound::OutboundTarget;
use palisade_proxy::tls::TrustBundle;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use palisade_testkit::pki::{Authority, Leaf};

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
pub const EVIL: &str = "spiffe://cluster.local/ns/shop/sa/evil";

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn policy(default_policy: DefaultPolicy, policies: Vec<ResolvedPolicy>) -> InboundPolicy {
    InboundPolicy {
        trust_domain: "cluster.local".into(),
        workload: "shop/api".into(),
        namespace: "shop".into(),
        default_policy,
        policies,
    }
}

pub fn resolved(name: &str, yaml_allow: &str, audit: bool) -> ResolvedPolicy {
    ResolvedPolicy {
        name: name.into(),
        ports: vec![],
        mode: if audit {
            palisade_ca_api::policy::PolicyMode::Audit
        } else {
            palisade_ca_api::policy::PolicyMode::Enforce
        },
        allow: serde_json::from_str(yaml_allow).unwrap(),
    }
}

pub fn meshed(addr: SocketAddr, id: &str) -> Destination {
    Destination::meshed(addr.ip(), id.parse().unwrap(), None)
}

pub fn plain(addr: SocketAddr) -> Destination {
    Destination::unmeshed(addr.ip())
}

pub struct Proxy {
    pub bound: Bound,
    pub store: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub mesh: Arc<MeshView>,
    pub metrics: Arc<Metrics>,
}

pub fn limits() -> Limits {
    Limits {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        // Generous: a loaded CI machine must not turn a slow ClientHello into plaintext.
        detect_window: Duration::from_secs(1),
        destination_wait: Duration::from_millis(300),
        max_connections: 64,
        max_connections_per_source: 64,
        tunnels: true,
        ..Limits::default()
    }
}

pub struct ProxySpec<'a> {
    pub authority: &'a Authority,
    pub leaf: Option<Leaf>,
    pub inbound_port: u16,
    pub outbound_to: SocketAddr,
    pub limits: Limits,
    pub drain: Duration,
    pub probes: &'a str,
    /// The proxy's clock (default: the system's).
    pub clock: Option<Clock>,
}

impl<'a> ProxySpec<'a> {
    pub fn new(authority: &'a Authority, id: &str) -> Self {
        ProxySpec {
            authority,
            leaf: Some(authority.leaf(id)),
            inbound_port: 9,
            outbound_to: "127.0.0.1:9".parse().unwrap(),
            limits: limits(),
            drain: Duration::from_secs(5),
            probes: "{}",
            clock: None,
        }
    }
}

pub async fn start_proxy(spec: ProxySpec<'_>) -> Proxy {
    let clock = spec.clock.clone().unwrap_or_else(Clock::system);
    let store = Arc::new(CertStore::new(clock));
    if let Some(leaf) = &spec.leaf {
        store.install(Installed::from_chain(leaf.chain.clone(), leaf.key()).unwrap());
    }
    let bundle = Arc::new(TrustBundle::new(vec![spec.authority.root_der()]).unwrap());
    let mesh = Arc::new(MeshView::new(MeshConfig {
        pod_ip: Some("127.0.0.1".parse().unwrap()),
        ..MeshConfig::default()
    }));
    let metrics = Arc::new(Metrics::new());
    let bound = start(
        Settings {
            inbound_listen: loopback0(),
            outbound_listen: loopback0(),
            admin_listen: loopback0(),
            inbound_target: InboundTarget::FixedPort(spec.inbound_port),
            outbound_target: OutboundTarget::Fixed(spec.outbound_to),
            limits: spec.limits,
            drain_timeout: spec.drain,
            probes: palisade_proxy::probes::parse_probes(spec.probes).unwrap(),
            probe_timeout: Duration::from_secs(1),
            admin_remote_metrics: false,
            init_report: String::new(),
        },
        Parts {
            store: store.clone(),
            bundle: bundle.clone(),
            mesh: mesh.clone(),
            metrics: metrics.clone(),
            identity: None,
            mesh_watcher: None,
        },
    )
    .await
    .unwrap();
    Proxy {
        bound,
        store,
        bundle,
        mesh,
        metrics,
    }
}

/// An app that echoes what it reads until EOF, then closes; counts its connections.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl EchoApp {
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

pub async fn echo_app() -> EchoApp {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    EchoApp { addr, accepted }
}

/// An app that speaks first (as MySQL or SMTP do), then echoes.
pub async fn greeting_app(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `msg`, half-closes, and reads everything back. Errors and early closes give
/// whatever arrived.
pub async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(msg).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// A test-only verifier that accepts any server: these clients test the server side.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        palisade_ca_api::tls::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A mesh-looking TLS client (ALPN palisade/1) presenting `leaf`, or nothing.
pub fn raw_client(leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(palisade_ca_api::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut c = match leaf {
        Some(l) => b.with_client_auth_cert(l.chain.clone(), l.key()).unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"palisade/1".to_vec()];
    Arc::new(c)
}

/// Connects `config` to `addr`, sends `msg`, half-closes and reads the answer. `Err` when the
/// handshake or the exchange fails.
pub async fn tls_exchange(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    msg: &[u8],
) -> Result<Vec<u8>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await?;
    tls.write_all(msg).await?;
    tls.flush().await?;
    tls.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(out)
}

/// Polls `cond` every 10 ms for at most 5 s (a bound for CI, not a timing assertion).
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// GET or POST on the admin port; returns (status, body).
pub async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}
