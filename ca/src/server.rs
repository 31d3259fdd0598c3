//! Start-up and serving: key material, authenticator, mesh source, the TLS API listener (HTTP/1.1
//! and HTTP/2) and the admin listener. [`start`] returns the real addresses, so tests bind port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::parse_pem_certs;
use palisade_ca_api::tls::crypto_provider;
use palisade_ca_api::wire::{ErrorBody, ErrorCode};
use palisade_plumbing::credentials::{ReloadingResolver, certified_key};
use rcgen::KeyPair;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::auth::jwks::JwksAuthenticator;
use crate::auth::kube::KubeAuthenticator;
use crate::auth::local::{LocalAuthenticator, LocalIssuer};
use crate::authority::Authority;
use crate::config::{AuthMode, ConfigError, MeshSource, ServeConfig};
use crate::keys::{KeyError, KeySource, load_or_create};
use crate::kube::secret_keys::{SecretKeyError, load_or_create_in_secret};
use crate::kube::{WatchSettings, spawn_watches};
use crate::mesh::file::{MeshFileError, load_mesh_file, reload_loop};
use crate::mesh::{MeshPublisher, MeshState};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::tls_server::OptionalClientAuth;

/// The CA's own serving certificate lives this long and is renewed at half-life.
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A connection that has sent no TLS bytes by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Mesh(#[from] MeshFileError),
    #[error(transparent)]
    SecretKeys(#[from] SecretKeyError),
    #[error(
        "cannot reach the Kubernetes API: {0} (in a pod, is the service-account token mounted? outside, is KUBECONFIG set?)"
    )]
    KubeClient(String),
    #[error("--auth jwks: {0}")]
    Jwks(String),
    #[error("--extra-trust-roots {0}: {1}")]
    ExtraRoots(std::path::PathBuf, String),
    #[error("cannot listen on {0}: {1} (is another process using the port?)")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot open the audit file {0}: {1}")]
    AuditFile(std::path::PathBuf, std::io::Error),
    #[error("cannot make the CA's serving certificate: {0}")]
    ServerCert(String),
}

/// What request handlers share.
pub struct Ca {
    pub config: ServeConfig,
    pub authority: Authority,
    pub authenticator: Arc<dyn Authenticator>,
    pub publisher: MeshPublisher,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    pub audit: AuditLog,
    pub roots: Arc<RootCertStore>,
    pub shutdown: watch::Receiver<bool>,
    /// False until the mesh source has its first complete state (the Kubernetes watches).
    pub ready: watch::Receiver<bool>,
}

/// A started CA: its addresses, and the handle to stop it.
pub struct Running {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca: Arc<Ca>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the grace period), ends watches.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

pub async fn start(config: ServeConfig) -> Result<Running, StartError> {
    start_with_kube_client(config, None).await
}

/// [`start`], with the Kubernetes client given (tests pass a mock); `None` makes one from the
/// pod's service account or KUBECONFIG when kube mode needs it.
pub async fn start_with_kube_client(
    config: ServeConfig,
    kube_client: Option<::kube::Client>,
) -> Result<Running, StartError> {
    config.validate()?;
    let now = time::OffsetDateTime::now_utc();
    let needs_kube = config.source == MeshSource::Kube || config.auth == AuthMode::Kube;
    let kube_client = match (needs_kube, kube_client) {
        (false, _) => None,
        (true, Some(client)) => Some(client),
        (true, None) => Some(
            ::kube::Client::try_default()
                .await
                .map_err(|e| StartError::KubeClient(e.to_string()))?,
        ),
    };
    let material = match (&kube_client, &config.source, &config.keys) {
        // In a cluster the generated root lives in a Secret, shared by replicas and restarts.
        (Some(client), MeshSource::Kube, KeySource::Generated) => {
            load_or_create_in_secret(
                client,
                &config.namespace,
                &config.state_dir,
                &config.trust_domain,
                now,
            )
            .await?
        }
        _ => load_or_create(&config.state_dir, &config.keys, &config.trust_domain, now)?,
    };
    let extra_roots = match &config.extra_trust_roots {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| StartError::ExtraRoots(path.clone(), e.to_string()))?;
            parse_pem_certs(&text)
                .map_err(|e| StartError::ExtraRoots(path.clone(), e.to_string()))?
        }
    };
    let authority = Authority::new(material, extra_roots)?;
    let roots = Arc::new(
        palisade_ca_api::tls::root_store(authority.roots())
            .map_err(|e| StartError::ServerCert(e.to_string()))?,
    );
    let metrics = Arc::new(Metrics::new(
        authority.intermediate_not_after().unix_timestamp(),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let authenticator: Arc<dyn Authenticator> = match &config.auth {
        AuthMode::Local => Arc::new(LocalAuthenticator {
            issuer: LocalIssuer::load_or_create(&config.state_dir)?,
            audience: palisade_ca_api::wire::TOKEN_AUDIENCE.into(),
        }),
        AuthMode::Jwks { issuer, source } => {
            let auth = JwksAuthenticator::new(
                issuer.clone(),
                palisade_ca_api::wire::TOKEN_AUDIENCE.into(),
                source.clone(),
            )
            .await
            .map_err(StartError::Jwks)?;
            tasks.spawn(auth.clone().refresh_loop(shutdown_rx.clone()));
            auth
        }
        AuthMode::Kube => Arc::new(KubeAuthenticator::new(
            kube_client.clone().expect("made above for kube mode"),
            palisade_ca_api::wire::TOKEN_AUDIENCE.into(),
        )),
    };

    let (publisher, ready) = match &config.source {
        MeshSource::File(mesh_file) => {
            let publisher = MeshPublisher::new(load_mesh_file(mesh_file, &config.trust_domain)?);
            tasks.spawn(reload_loop(
                mesh_file.clone(),
                config.trust_domain.clone(),
                publisher.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            ));
            (publisher, watch::channel(true).1)
        }
        MeshSource::Kube => {
            let client = kube_client.clone().expect("made above for kube mode");
            let publisher = MeshPublisher::new(MeshState::new(
                config.trust_domain.clone(),
                config.default_policy,
                Default::default(),
                Vec::new(),
                Vec::new(),
            ));
            let outputs = spawn_watches(
                client.clone(),
                WatchSettings {
                    trust_domain: config.trust_domain.clone(),
                    default_policy: config.default_policy,
                },
                publisher.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
                &mut tasks,
            );
            tasks.spawn(crate::kube::anchors::distribute(
                client,
                crate::kube::anchors::bundle_text(authority.trust_bundle_pem()),
                outputs.opted_in,
                shutdown_rx.clone(),
            ));
            (publisher, outputs.ready)
        }
    };

    let ca_id = SpiffeId::new(
        &config.trust_domain,
        &config.namespace,
        palisade_ca_api::contract::CA_SERVICE_ACCOUNT,
    )
    .map_err(|e| StartError::ServerCert(e.to_string()))?;
    let dns_names = vec![
        format!("palisade-ca.{}.svc", config.namespace),
        format!(
            "palisade-ca.{}.svc.{}",
            config.namespace, config.trust_domain
        ),
    ];
    let resolver = Arc::new(ReloadingResolver::new(server_cert(
        &authority, &ca_id, &dns_names,
    )?));

    let api = TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;
    let api_addr = api
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;

    let mut server_config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::ServerCert(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientAuth::new(&roots)))
        .with_cert_resolver(resolver.clone());
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let audit = match &config.audit_file {
        None => AuditLog::stdout(),
        Some(path) => AuditLog::writing_to(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| StartError::AuditFile(path.clone(), e))?,
        ),
    };

    let ca = Arc::new(Ca {
        limiter: RateLimiter::new(config.rate_limit_per_identity, config.rate_limit_burst),
        audit,
        config,
        authority,
        authenticator,
        publisher,
        metrics,
        roots,
        shutdown: shutdown_rx.clone(),
        ready,
    });
    tasks.spawn(renew_server_cert(
        ca.clone(),
        resolver,
        ca_id,
        dns_names,
        shutdown_rx.clone(),
    ));
    tasks.spawn(serve_api(api, acceptor, ca.clone(), shutdown_rx.clone()));
    tasks.spawn(crate::admin::serve_admin(admin, ca.clone(), shutdown_rx));
    tracing::info!(%api_addr, %admin_addr, trust_domain = %ca.config.trust_domain, authenticator = ca.authenticator.name(), "palisade-ca serving");
    Ok(Running {
        api_addr,
        admin_addr,
        ca,
        shutdown: shutdown_tx,
        tasks,
    })
}

fn server_cert(
    authority: &Authority,
    id: &SpiffeId,
    dns_names: &[String],
) -> Result<CertifiedKey, StartError> {
    let err = |e: String| StartError::ServerCert(e);
    let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let ttl = time::Duration::try_from(SERVER_CERT_TTL).expect("fits");
    let issued = authority
        .issue_server(id, dns_names, &key, ttl, time::OffsetDateTime::now_utc())
        .map_err(|e| err(e.to_string()))?;
    let mut chain: Vec<CertificateDer<'static>> = vec![issued.der];
    for pem in authority.chain_tail() {
        chain.extend(parse_pem_certs(pem).map_err(|e| err(e.to_string()))?);
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    certified_key(chain, key).map_err(|e| err(e.to_string()))
}

async fn renew_server_cert(
    ca: Arc<Ca>,
    resolver: Arc<ReloadingResolver>,
    id: SpiffeId,
    dns_names: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SERVER_CERT_TTL / 2) => {}
            _ = shutdown.changed() => return,
        }
        match server_cert(&ca.authority, &id, &dns_names) {
            Ok(ck) => resolver.swap(ck),
            Err(error) => {
                tracing::error!(%error, "could not renew the CA's serving certificate; will retry")
            }
        }
    }
}

async fn serve_api(
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
                    Ok::<_, std::convert::Infallible>(crate::api::route(ca, peer_chain, req).await)
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
