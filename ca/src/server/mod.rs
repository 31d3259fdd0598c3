//! Start-up: key material, authenticator, mesh source, the CA's serving certificate, then the
//! TLS API listener ([`accept`]) and the admin listener. [`start`] returns the real addresses, so
//! tests bind port 0. Each step is a function of [`parts`]; this file only puts them in order.

mod accept;
pub(crate) mod handshakes;
mod parts;
mod pressure;
mod serving_cert;

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_plumbing::credentials::ReloadingResolver;
use tokio::sync::watch;
use tokio::task::JoinSet;

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
    #[error(transparent)]
    Rotation(#[from] crate::rotation::RotationError),
    #[error("--state-dir: {0}")]
    StateDir(String),
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
    let metrics = Arc::new(Metrics::new(0));
    let (rotation, secret_sync) = parts::rotation(&config, kube_client.as_ref(), &metrics).await?;
    let rotation = Arc::new(rotation);
    let authority = rotation.authority();
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
    if config.manage_injector_tls
        && let Some(client) = kube_client.clone()
    {
        tasks.spawn(crate::kube::injector_tls::maintain(
            crate::kube::injector_tls::InjectorTls {
                client,
                namespace: config.namespace.clone(),
                trust_domain: config.trust_domain.clone(),
                rotation: rotation.clone(),
                metrics: metrics.clone(),
                check_every: crate::kube::injector_tls::CHECK_EVERY,
                retired_root_grace: crate::kube::injector_tls::RETIRED_ROOT_GRACE,
            },
            shutdown_rx.clone(),
        ));
    }
    let background = parts::Background {
        metrics: &metrics,
        shutdown: &shutdown_rx,
        tasks: &mut tasks,
    };
    let rotation_kube = secret_sync.zip(kube_client.clone());
    let (publisher, ready) = parts::mesh_source(
        &config,
        kube_client,
        rotation.subscribe(),
        pod_deletions,
        background,
    )?;

    let serving = ServingIdentity::of(&config)?;
    let resolver = Arc::new(ReloadingResolver::new(serving_cert::server_cert(
        &authority, &serving,
    )?));
    let acceptor = serving_cert::acceptor(&authority.root_store(), resolver.clone())?;
    let (api, api_addr) = parts::bind(config.listen).await?;
    let (admin, admin_addr) = parts::bind(config.admin_listen).await?;

    let ca = Arc::new(Ca {
        limiter: RateLimiter::new(config.rate_limit_per_identity, config.rate_limit_burst),
        source_limiter: RateLimiter::new(config.source_rate_limit, config.source_rate_limit_burst),
        audit: parts::audit_log(&config)?,
        config,
        rotation,
        authenticator,
        publisher,
        metrics,
        shutdown: shutdown_rx.clone(),
        ready,
    });
    tasks.spawn(serving_cert::renew_server_cert(
        ca.clone(),
        resolver,
        serving,
        shutdown_rx.clone(),
    ));
    match rotation_kube {
        // Kubernetes mode: the Lease's holder drives, every replica follows the Secret.
        Some((sync, client)) => {
            let pod = crate::kube::rotation_lease::pod_identity(ca.config.pod_name.clone());
            let namespace = &ca.config.namespace;
            tasks.spawn(crate::kube::rotation_store::run(
                ca.rotation.clone(),
                sync,
                crate::kube::rotation_lease::LeaseKeeper::new(
                    client.clone(),
                    namespace,
                    pod.clone(),
                ),
                crate::kube::rotation_store::Peers {
                    configmaps: ::kube::Api::namespaced(client.clone(), namespace),
                    pods: ::kube::Api::namespaced(client, namespace),
                    pod,
                },
                ca.publisher.clone(),
                ca.audit.clone(),
                shutdown_rx.clone(),
            ));
        }
        None => {
            tasks.spawn(crate::rotation::run(
                ca.rotation.clone(),
                ca.publisher.clone(),
                ca.audit.clone(),
                shutdown_rx.clone(),
            ));
        }
    }
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
