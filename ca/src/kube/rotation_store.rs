//! Rotation in Kubernetes mode: the rotation's state (current keys, `next-*` keys,
//! `rotation.json`, `rotation-proxies.json`) lives in Secret `palisade-ca-keys` under the file
//! names of a state directory. Every replica holds it in memory ([`SharedStore`]); the holder of
//! the rotation Lease ([`super::rotation_lease`]) steps the rotation and writes each move back
//! with the resourceVersion it read, and every replica re-reads the Secret and reloads what
//! changed. See docs/rotation.md, "Kubernetes mode".

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::rotation_lease::{LEASE_NAME, Leadership, LeaseKeeper, RENEW_EVERY};
use super::rotation_reports::{PUBLISH_EVERY, ReportWriter, collect};
use super::secret_keys::{SECRET_NAME, SecretKeyError, new_secret, stored_files, to_data};
use crate::audit::AuditLog;
use crate::keys::MemoryStore;
use crate::mesh::MeshPublisher;
use crate::metrics::Metrics;
use crate::rotation::keyset::{NEXT, PROXIES_FILE, ROTATION_FILE};
use crate::rotation::{Rotation, RotationError, Settings, SharedStore};

/// How often every replica re-reads the Secret.
pub const REREAD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The Secret's entries: the current set (required, as [`stored_files`] checks it) and, while
/// a rotation runs, the next set and the records. Unknown keys are left out.
pub fn stored_entries(namespace: &str, secret: &Secret) -> Result<MemoryStore, SecretKeyError> {
    let mut entries = stored_files(namespace, secret)?;
    let data = secret.data.clone().unwrap_or_default();
    let pem = [
        NEXT.root_cert,
        NEXT.root_key,
        NEXT.intermediate_cert,
        NEXT.intermediate_key,
    ];
    for key in pem
        .iter()
        .chain([ROTATION_FILE, PROXIES_FILE, NEXT.root_key_offline].iter())
    {
        let Some(value) = data.get(*key) else {
            continue;
        };
        let malformed = |problem: &str| SecretKeyError::Malformed {
            namespace: namespace.into(),
            key: (*key).into(),
            problem: problem.into(),
        };
        let text = String::from_utf8(value.0.clone()).map_err(|_| malformed("not UTF-8 text"))?;
        if pem.contains(key) && !text.contains("-----BEGIN ") {
            return Err(malformed("not PEM"));
        }
        entries.insert((*key).to_owned(), text);
    }
    Ok(entries)
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Secret(#[from] SecretKeyError),
    #[error(
        "cannot list the CA replicas' proxy reports (ConfigMaps labelled palisade.dev/ca-proxies=true) in {namespace}: {source}; the rotation does not move until it can (the CA's Role must allow configmaps list)"
    )]
    Reports {
        namespace: String,
        source: kube::Error,
    },
}

/// Where this replica's proxies are told to the others: the CA's namespace's ConfigMaps, and
/// this pod's name.
pub struct Peers {
    pub configmaps: Api<ConfigMap>,
    /// The CA's namespace's pods: whether a replica gone quiet still runs.
    pub pods: Api<k8s_openapi::api::core::v1::Pod>,
    pub pod: String,
}

/// What a write of the Secret came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Nothing changed since the last read or write.
    Unchanged,
    Stored,
    /// Another writer changed the Secret since we read it: re-read and reload.
    Conflict,
}

/// The Secret as this replica last read or wrote it, and the store the rotation writes into.
pub struct SecretSync {
    /// When the driver last said that `trusting` waits for a silent replica (Unix seconds).
    waiting_said_at: i64,
    api: Api<Secret>,
    namespace: String,
    store: SharedStore,
    /// The Secret as last read or written: its resourceVersion guards the next write.
    last: Secret,
    /// Its entries.
    synced: MemoryStore,
}

impl std::fmt::Debug for SecretSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSync")
            .field("namespace", &self.namespace)
            .field("resource_version", &self.last.metadata.resource_version)
            .finish_non_exhaustive()
    }
}

fn keys_error(namespace: &str, error: RotationError) -> SecretKeyError {
    SecretKeyError::Keys {
        namespace: namespace.into(),
        message: error.to_string(),
    }
}

impl SecretSync {
    /// Says, at most once a minute, that `trusting` waits for replicas that run but do not
    /// report their proxies.
    fn say_waiting(&mut self, silent: &[String], now: OffsetDateTime) {
        let unix = now.unix_timestamp();
        if unix - self.waiting_said_at >= 60 {
            self.waiting_said_at = unix;
            tracing::warn!(replicas = ?silent,
                "root rotation: these CA replicas run but have not reported their proxies for over a minute (cut off from the API server?); the rotation stays in trusting until they report or their pods are gone");
        }
    }

    /// Reads the Secret (creating it when absent), opens the rotation over its entries (which
    /// makes a root when there is none, resumes a rotation, finishes one left `retiring`, renews
    /// an expiring intermediate), and writes back what opening changed, guarded by the
    /// resourceVersion read; on 409 it reads and opens again.
    pub async fn open(
        client: &kube::Client,
        namespace: &str,
        trust_domain: &str,
        settings: Settings,
        extra_roots: Vec<CertificateDer<'static>>,
        metrics: Arc<Metrics>,
        now: OffsetDateTime,
    ) -> Result<(Rotation, SecretSync), SecretKeyError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let api_err = |verb, source| SecretKeyError::Api {
            verb,
            namespace: namespace.into(),
            source,
        };
        const ATTEMPTS: u32 = 3;
        for _ in 0..ATTEMPTS {
            let existing = api
                .get_opt(SECRET_NAME)
                .await
                .map_err(|e| api_err("get", e))?;
            let read = match &existing {
                Some(secret) => stored_entries(namespace, secret)?,
                None => MemoryStore::new(),
            };
            let store = SharedStore::new(read.clone());
            let rotation = Rotation::open(
                Box::new(store.clone()),
                trust_domain,
                settings.clone(),
                extra_roots.clone(),
                metrics.clone(),
                now,
            )
            .map_err(|e| keys_error(namespace, e))?;
            let entries = store.snapshot();
            let written = match existing {
                None => {
                    api.create(
                        &PostParams::default(),
                        &new_secret(namespace, entries.clone()),
                    )
                    .await
                }
                Some(secret) if entries == read => Ok(secret),
                Some(mut secret) => {
                    secret.data = Some(to_data(entries.clone()));
                    api.replace(SECRET_NAME, &PostParams::default(), &secret)
                        .await
                }
            };
            let last = match written {
                Ok(secret) => secret,
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::info!(%namespace, secret = SECRET_NAME, "the Secret changed while the CA opened it; reading it again");
                    continue;
                }
                Err(e) => return Err(api_err("write", e)),
            };
            let sync = SecretSync {
                waiting_said_at: 0,
                api,
                namespace: namespace.into(),
                store,
                last,
                synced: entries,
            };
            return Ok((rotation, sync));
        }
        Err(SecretKeyError::Contended {
            namespace: namespace.into(),
            attempts: ATTEMPTS,
        })
    }

    /// The store the rotation writes into.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Whether the rotation made a move not yet in the Secret.
    pub fn dirty(&self) -> bool {
        self.store.snapshot() != self.synced
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.last.metadata.resource_version.as_deref()
    }

    /// Writes the store to the Secret when it changed, with the resourceVersion last read.
    pub async fn write(&mut self) -> Result<Written, SecretKeyError> {
        let entries = self.store.snapshot();
        if entries == self.synced {
            return Ok(Written::Unchanged);
        }
        let mut secret = self.last.clone();
        secret.data = Some(to_data(entries.clone()));
        match self
            .api
            .replace(SECRET_NAME, &PostParams::default(), &secret)
            .await
        {
            Ok(stored) => {
                self.last = stored;
                self.synced = entries;
                Ok(Written::Stored)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Written::Conflict),
            Err(source) => Err(SecretKeyError::Api {
                verb: "update",
                namespace: self.namespace.clone(),
                source,
            }),
        }
    }

    /// Reads the Secret and, when it differs from what this replica holds, reloads the rotation
    /// from it (a move this replica has not written is dropped: the Secret is the truth).
    /// Returns whether the rotation changed.
    pub async fn refresh(
        &mut self,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<bool, SecretKeyError> {
        let secret = self
            .api
            .get(SECRET_NAME)
            .await
            .map_err(|source| SecretKeyError::Api {
                verb: "get",
                namespace: self.namespace.clone(),
                source,
            })?;
        let entries = stored_entries(&self.namespace, &secret)?;
        self.last = secret;
        if entries == self.store.snapshot() {
            self.synced = entries;
            return Ok(false);
        }
        let changed = rotation
            .reload(&self.store, entries.clone(), now)
            .map_err(|e| keys_error(&self.namespace, e))?;
        self.synced = entries;
        Ok(changed)
    }
}

/// Drives (as the Lease's holder) or follows the rotation until shutdown. The holder writes
/// every move to the Secret before it takes the next step; every replica re-reads the Secret
/// every [`REREAD_EVERY`] and whenever it gains or loses the Lease.
pub async fn run(
    rotation: Arc<Rotation>,
    mut sync: SecretSync,
    lease: LeaseKeeper,
    peers: Peers,
    publisher: MeshPublisher,
    audit: AuditLog,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Some(t) = rotation.take_finished_at_start() {
        audit.rotation(&t).await;
    }
    let mut leadership = Leadership::Follower(None);
    sync.store()
        .refuse_writes(not_driving(&leadership, lease.identity(), &sync.namespace));
    let mut last_lease = None::<tokio::time::Instant>;
    // A driver whose renewal is late stops before its Lease can expire for the others.
    let mut driving_until = tokio::time::Instant::now();
    let mut last_read = tokio::time::Instant::now();
    let mut reread_now = false;
    let mut last_error = String::new();
    let mut writer = ReportWriter::new(peers.configmaps.clone(), &peers.pod);
    let mut last_publish = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        // A slow API server must not hold up shutdown: a second cut short is redone.
        let second = async {
            let tick = tokio::time::Instant::now();
            if last_lease.is_none_or(|at| tick.duration_since(at) >= RENEW_EVERY) {
                last_lease = Some(tick);
                let seen = lease.tick(k8s_openapi::jiff::Timestamp::now()).await;
                if seen == Leadership::Leader {
                    driving_until = tick + DRIVE_FOR;
                }
                if seen != leadership {
                    tracing::info!(identity = lease.identity(), leader = ?seen, "rotation leadership changed");
                    reread_now = true;
                    sync.store().refuse_writes(not_driving(
                        &seen,
                        lease.identity(),
                        &sync.namespace,
                    ));
                    leadership = seen;
                }
            }
            if last_publish.is_none_or(|at| tick.duration_since(at) >= PUBLISH_EVERY) {
                last_publish = Some(tick);
                if let Err(error) = writer.publish(&rotation, OffsetDateTime::now_utc()).await {
                    tracing::warn!(%error, "cannot publish this replica's proxy reports; the driver stops counting them after 60 s (the CA's Role must allow configmaps patch)");
                }
            }
            let driver =
                leadership == Leadership::Leader && tokio::time::Instant::now() < driving_until;
            let result = drive_once(
                &rotation,
                &mut sync,
                &peers,
                driver,
                &publisher,
                &audit,
                reread_now || tick.duration_since(last_read) >= REREAD_EVERY,
            )
            .await;
            match result {
                Ok(read) => {
                    last_error.clear();
                    if read {
                        last_read = tick;
                        reread_now = false;
                    }
                }
                Err(error) => {
                    let text = error.to_string();
                    if text != last_error {
                        tracing::error!(%error, "rotation in Kubernetes mode: a step or a Secret sync failed; retrying every second");
                        last_error = text;
                    }
                }
            }
        };
        tokio::select! {
            () = second => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How long after a renewal of the Lease its holder keeps driving: less than the Lease's
/// duration, so that it stops before another replica may take over.
const DRIVE_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Why `POST /rotation/*` is refused on this replica, unless it drives the rotation.
fn not_driving(leadership: &Leadership, me: &str, namespace: &str) -> Option<String> {
    let holder = match leadership {
        Leadership::Leader => return None,
        Leadership::Follower(Some(holder)) => holder.as_str(),
        Leadership::Follower(None) => {
            return Some(format!(
                "this CA replica ({me}) does not drive the rotation and no replica holds Lease {LEASE_NAME} in {namespace} right now: retry in a few seconds"
            ));
        }
    };
    Some(format!(
        "this CA replica ({me}) does not drive the rotation: {holder} holds Lease {LEASE_NAME} in {namespace}. Run the command there: kubectl exec -n {namespace} {holder} -- palisade-ca rotate ..."
    ))
}

/// One second of [`run`]: the driver writes a pending move (a 409 makes it re-read), or steps
/// and writes what the step did; a replica re-reads when `reread` (never over a pending move of
/// its own). Before each step the driver reads the other replicas' proxy reports; without them
/// it does not step. Returns whether the Secret was read.
pub async fn drive_once(
    rotation: &Rotation,
    sync: &mut SecretSync,
    peers: &Peers,
    driver: bool,
    publisher: &MeshPublisher,
    audit: &AuditLog,
    reread: bool,
) -> Result<bool, SyncError> {
    let now = OffsetDateTime::now_utc();
    // Read first, so that a replica that just gained the Lease steps from the Secret's state,
    // not from what it read up to 10 s ago (never over a move of its own not yet written).
    let mut read = false;
    if reread && !(driver && sync.dirty()) {
        sync.refresh(rotation, now).await?;
        read = true;
    }
    if driver {
        // A move made by `POST /rotation/*` or the last step, not stored yet.
        if sync.write().await? == Written::Conflict {
            sync.refresh(rotation, now).await?;
            return Ok(true);
        }
        // Only a running rotation waits for proxies; an idle one spares the API server the list.
        let phase = rotation.status().phase;
        if phase != crate::rotation::Phase::Idle.as_str() {
            let collected = collect(&peers.configmaps, &peers.pods, rotation, &peers.pod, now)
                .await
                .map_err(|source| SyncError::Reports {
                    namespace: sync.namespace.clone(),
                    source,
                })?;
            if phase == crate::rotation::Phase::Trusting.as_str() && !collected.silent.is_empty() {
                sync.say_waiting(&collected.silent, now);
                return Ok(read);
            }
        }
        let state = publisher.current().state;
        if let Some(t) = rotation
            .step(&state, now)
            .map_err(|e| keys_error(&sync.namespace, e))?
        {
            audit.rotation(&t).await;
        }
        if sync.write().await? == Written::Conflict {
            sync.refresh(rotation, now).await?;
            return Ok(true);
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    /// An operator's root kept offline survives the Secret: its note stands for the root key,
    /// and a root key merely missing is still refused by name.
    #[test]
    fn an_offline_roots_note_stands_for_its_key_and_nothing_else_does() {
        let keyless = [
            ("root.pem", PEM),
            ("intermediate.pem", PEM),
            ("intermediate-key.pem", PEM),
            ("root-key-offline", "kept offline\n"),
            ("next-root-key-offline", "kept offline\n"),
            ("unknown", "left out"),
        ];
        let entries = stored_entries("palisade-system", &secret(&keyless)).unwrap();
        assert_eq!(
            entries.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "intermediate-key.pem",
                "intermediate.pem",
                "next-root-key-offline",
                "root-key-offline",
                "root.pem"
            ]
        );
        let e = stored_entries("palisade-system", &secret(&keyless[..3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key root-key.pem: missing"), "{e}");
    }
}
