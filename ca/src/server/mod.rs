//! Start-up: key material, authenticator, mesh source, the CA's serving certificate, then the
//! TLS API listener ([`accept`]) and the admin listener. [`start`] returns the real addresses, so
//! tests bind port 0. Each step is a function of [`parts`]; this file only puts them in order.

mod accept;
mod parts;
mod serving_cert;

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_plumbing::credentials::ReloadingResolver;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::authority::Authority;
use crate::config::ConfigError;
use crate::config::ServeConfig;
use crate::keys::KeyError;
use crate::kube::secret_keys::SecretKeyError;
use crate::mesh::file::MeshFileError;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::state::Ca;
use serving_cert::ServingIdentity;

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
    let kube_client = parts::kube_client(&config, kube_client).await?;
    let material = parts::key_material(&config, kube_client.as_ref()).await?;
    let authority = Authority::new(material, parts::extra_roots(&config)?)?;
    let roots = Arc::new(
        palisade_ca_api::tls::root_store(authority.roots())
            .map_err(|e| StartError::ServerCert(e.to_string()))?,
    );
    let metrics = Arc::new(Metrics::new(
        authority.intermediate_not_after().unix_timestamp(),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let background = parts::Background {
        metrics: &metrics,
        shutdown: &shutdown_rx,
        tasks: &mut tasks,
    };
    // The pod watch tells the TokenReview cache which pods are gone.
    let pod_deletions = Arc::new(crate::auth::kube::PodDeletions::default());
    let authenticator = parts::authenticator(
        &config,
        kube_client.as_ref(),
        pod_deletions.clone(),
        background,
    )
    .await?;
    let background = parts::Background {
        metrics: &metrics,
        shutdown: &shutdown_rx,
        tasks: &mut tasks,
    };
    let (publisher, ready) =
        parts::mesh_source(&config, kube_client, &authority, pod_deletions, background)?;

    let serving = ServingIdentity::of(&config)?;
    let resolver = Arc::new(ReloadingResolver::new(serving_cert::server_cert(
        &authority, &serving,
    )?));
    let acceptor = serving_cert::acceptor(&roots, resolver.clone())?;
    let (api, api_addr) = parts::bind(config.listen).await?;
    let (admin, admin_addr) = parts::bind(config.admin_listen).await?;

    let ca = Arc::new(Ca {
        limiter: RateLimiter::new(config.rate_limit_per_identity, config.rate_limit_burst),
        source_limiter: RateLimiter::new(config.source_rate_limit, config.source_rate_limit_burst),
        audit: parts::audit_log(&config)?,
        config,
        authority,
        authenticator,
        publisher,
        metrics,
        roots,
        shutdown: shutdown_rx.clone(),
        ready,
    });
    tasks.spawn(serving_cert::renew_server_cert(
        ca.clone(),
        resolver,
        serving,
        shutdown_rx.clone(),
    ));
    tasks.spawn(accept::serve_api(
        api,
        acceptor,
        ca.clone(),
        shutdown_rx.clone(),
    ));
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
