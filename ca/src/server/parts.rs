//! The steps of start-up, each on its own: the Kubernetes client when a mode needs one, the key
//! material (state dir or Secret), extra trust roots, the authenticator, the mesh source, the
//! audit log and the listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_ca_api::cert::parse_pem_certs;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::StartError;
use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::auth::jwks::JwksAuthenticator;
use crate::auth::kube::KubeAuthenticator;
use crate::auth::local::{LocalAuthenticator, LocalIssuer};
use crate::config::{AuthMode, MeshSource, ServeConfig};
use crate::keys::{DirStore, KeyError, KeySource, MemoryStore, load_or_create_in};
use crate::kube::rotation_store::SecretSync;
use crate::kube::{WatchSettings, spawn_watches};
use crate::mesh::file::{load_mesh_file_as_read, reload_loop};
use crate::mesh::{MeshPublisher, MeshState};
use crate::metrics::Metrics;
use crate::rotation::Rotation;

/// Where a step puts the tasks it starts, and what those tasks need.
pub(super) struct Background<'a> {
    pub metrics: &'a Arc<Metrics>,
    pub shutdown: &'a watch::Receiver<bool>,
    pub tasks: &'a mut JoinSet<()>,
}

/// The Kubernetes client when the mesh source or the authenticator needs one.
pub(super) async fn kube_client(
    config: &ServeConfig,
    given: Option<::kube::Client>,
) -> Result<Option<::kube::Client>, StartError> {
    let needs_kube = config.source == MeshSource::Kube || config.auth == AuthMode::Kube;
    match (needs_kube, given) {
        (false, _) => Ok(None),
        (true, Some(client)) => Ok(Some(client)),
        (true, None) => ::kube::Client::try_default()
            .await
            .map(Some)
            .map_err(|e| StartError::KubeClient(e.to_string())),
    }
}

/// The key material, behind the rotation that owns it: a generated root rotates itself, in the
/// state directory or (Kubernetes mode) in the Secret, which is then returned to keep in sync;
/// an operator's CA stays as it is.
pub(super) async fn rotation(
    config: &ServeConfig,
    kube_client: Option<&::kube::Client>,
    metrics: &Arc<Metrics>,
) -> Result<(Rotation, Option<SecretSync>), StartError> {
    let now = time::OffsetDateTime::now_utc();
    let mut settings = config.rotation.clone();
    settings.max_leaf_lifetime =
        time::Duration::try_from(config.max_cert_ttl).expect("a TTL of at most 24h fits");
    settings.serving_name = palisade_ca_api::contract::ca_dns_name(&config.namespace);
    let td = &config.trust_domain;
    let extra = extra_roots(config)?;
    let lifetimes = settings.lifetimes;
    let fixed = |material, why| {
        Rotation::fixed(
            material,
            td,
            settings.clone(),
            extra.clone(),
            metrics.clone(),
            why,
            now,
        )
    };
    // In a cluster the generated root lives in a Secret, shared by replicas and restarts; the
    // replica holding the rotation Lease drives it (crate::kube::rotation_store).
    if let (Some(client), MeshSource::Kube, KeySource::Generated) =
        (kube_client, &config.source, &config.keys)
    {
        let (rotation, sync) = SecretSync::open(
            client,
            &config.namespace,
            td,
            settings.clone(),
            extra.clone(),
            metrics.clone(),
            now,
        )
        .await?;
        // Until this replica holds the Lease, it starts and aborts nothing.
        sync.store().refuse_writes(Some(
            "this CA replica has not joined the rotation's Lease yet: retry in a few seconds"
                .into(),
        ));
        return Ok((rotation, Some(sync)));
    }
    Ok((
        match (kube_client, &config.source, &config.keys) {
            // An operator's CA in a cluster: the intermediate made under their root lives in
            // memory only (a new one each start), so no private key touches the pod's disk.
            (Some(_), MeshSource::Kube, keys) => fixed(
                load_or_create_in(&mut MemoryStore::new(), keys, td, &lifetimes, now)?,
                OPERATORS_CA,
            )?,
            (_, _, KeySource::Generated) => {
                let dir = &config.state_dir;
                std::fs::create_dir_all(dir).map_err(|e| KeyError::Write(dir.clone(), e))?;
                let lock =
                    crate::rotation::keyset::lock_state_dir(dir).map_err(StartError::StateDir)?;
                Rotation::open(
                    Box::new(DirStore(dir.clone())),
                    td,
                    settings.clone(),
                    extra.clone(),
                    metrics.clone(),
                    now,
                )?
                .hold(lock)
            }
            (_, _, keys) => fixed(
                load_or_create_in(
                    &mut DirStore(config.state_dir.clone()),
                    keys,
                    td,
                    &lifetimes,
                    now,
                )?,
                OPERATORS_CA,
            )?,
        },
        None,
    ))
}

const OPERATORS_CA: &str = "its root is the operator's (--root-cert or --intermediate-*)";

/// `--extra-trust-roots`: more roots in the bundle (a root rotation by hand).
pub(super) fn extra_roots(
    config: &ServeConfig,
) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let Some(path) = &config.extra_trust_roots else {
        return Ok(Vec::new());
    };
    let bad = |e: String| StartError::ExtraRoots(path.clone(), e);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let roots = parse_pem_certs(&text).map_err(|e| bad(e.to_string()))?;
    // With the root and, during a rotation, the next one, a bundle holds at most what a
    // proxy can confirm on its watch.
    let most = palisade_ca_api::wire::MAX_WATCH_ROOTS - 2;
    if roots.len() > most {
        return Err(bad(format!(
            "{} roots; at most {most} (a bundle holds at most {} roots with the CA's own and the next one during a rotation)",
            roots.len(),
            palisade_ca_api::wire::MAX_WATCH_ROOTS
        )));
    }
    Ok(roots)
}

pub(super) async fn authenticator(
    config: &ServeConfig,
    kube_client: Option<&::kube::Client>,
    pod_deletions: Arc<crate::auth::kube::PodDeletions>,
    background: Background<'_>,
) -> Result<Arc<dyn Authenticator>, StartError> {
    let audience = palisade_ca_api::wire::TOKEN_AUDIENCE;
    Ok(match &config.auth {
        AuthMode::Local => Arc::new(LocalAuthenticator {
            issuer: LocalIssuer::load_or_create(&config.state_dir)?,
            audience: audience.into(),
        }),
        AuthMode::Jwks { issuer, source } => {
            let auth = JwksAuthenticator::new(issuer.clone(), audience.into(), source.clone())
                .await
                .map_err(StartError::Jwks)?;
            background
                .tasks
                .spawn(auth.clone().refresh_loop(background.shutdown.clone()));
            auth
        }
        AuthMode::Kube => Arc::new(
            KubeAuthenticator::new(
                kube_client.cloned().expect("made for kube mode"),
                audience.into(),
            )
            .with_pod_deletions(pod_deletions),
        ),
    })
}

/// The mesh publisher, fed by the mesh file (reloaded on change) or by the Kubernetes watches,
/// and the readiness signal: ready at once for a file, after the first full sync for kube.
pub(super) fn mesh_source(
    config: &ServeConfig,
    kube_client: Option<::kube::Client>,
    trust: watch::Receiver<crate::rotation::TrustView>,
    pod_deletions: Arc<crate::auth::kube::PodDeletions>,
    background: Background<'_>,
) -> Result<(MeshPublisher, watch::Receiver<bool>), StartError> {
    let Background {
        metrics,
        shutdown,
        tasks,
    } = background;
    match &config.source {
        MeshSource::File(mesh_file) => {
            let (state, read) = load_mesh_file_as_read(mesh_file, &config.trust_domain)?;
            let publisher = MeshPublisher::new(state);
            tasks.spawn(reload_loop(
                mesh_file.clone(),
                config.trust_domain.clone(),
                publisher.clone(),
                metrics.clone(),
                read,
                shutdown.clone(),
            ));
            Ok((publisher, watch::channel(true).1))
        }
        MeshSource::Kube => {
            let client = kube_client.expect("made for kube mode");
            let publisher = MeshPublisher::new(MeshState::new(
                config.trust_domain.clone(),
                config.default_policy,
                Default::default(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            ));
            let settings = WatchSettings {
                trust_domain: config.trust_domain.clone(),
                default_policy: config.default_policy,
                pod_deletions: Some(pod_deletions),
            };
            let outputs = spawn_watches(
                client.clone(),
                settings,
                publisher.clone(),
                metrics.clone(),
                shutdown.clone(),
                tasks,
            );
            // The anchors follow the rotation: both roots while it is trusting or issuing.
            tasks.spawn(crate::kube::anchors::distribute_following(
                client.clone(),
                trust,
                outputs.opted_in.clone(),
                shutdown.clone(),
            ));
            // The webhook never injects into these, whatever their label says.
            let never_injected = ["kube-system".to_owned(), config.namespace.clone()].into();
            tasks.spawn(crate::kube::unmeshed::report_unmeshed(
                client,
                metrics.clone(),
                never_injected,
                outputs.opted_in,
                shutdown.clone(),
            ));
            Ok((publisher, outputs.ready))
        }
    }
}

pub(super) fn audit_log(config: &ServeConfig) -> Result<AuditLog, StartError> {
    let Some(path) = &config.audit_file else {
        return Ok(AuditLog::stdout());
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(AuditLog::writing_to)
        .map_err(|e| StartError::AuditFile(path.clone(), e))
}

pub(super) async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Bind(addr, e))?;
    Ok((listener, bound))
}
