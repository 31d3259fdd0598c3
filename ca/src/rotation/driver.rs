//! The rotation's state and the moves between phases. [`Rotation`] owns what the CA signs with
//! (an [`Authority`] swapped atomically, so a request in flight finishes with the one it
//! started with) and what every watch publishes ([`TrustView`]). [`run`] steps it once a second;
//! `POST /rotation/*` starts one.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use palisade_ca_api::cert::{serial_and_validity, sha256_fingerprint};
use palisade_ca_api::wire::RenewRequest;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

use super::keyset::{self, CURRENT, KeySet, NEXT};
use super::registry::{self, ProxyRegistry};
use super::status::{LaggingProxy, ProxyCounts, RotationStatus};
use super::{Kind, Phase, Record, Settings, Trigger};
use crate::authority::{Authority, BACKDATE};
use crate::keys::{KeyError, KeyMaterial, KeyStore, load_or_create_generated};
use crate::metrics::Metrics;

mod operator;
#[path = "shared.rs"]
pub mod shared;

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(
        "a {kind} rotation is already under way (phase {phase}): wait for it with `palisade-ca rotate status --wait 1h`"
    )]
    Running {
        kind: &'static str,
        phase: &'static str,
    },
    #[error(
        "this CA cannot rotate its own keys: {0}. Rotate by hand as docs/rotation.md describes"
    )]
    Unsupported(&'static str),
    #[error(
        "the rotation is {0}: leaves of the new root are out, so it can only go forward (`palisade-ca rotate status`)"
    )]
    TooLateToAbort(&'static str),
    #[error("no rotation is under way")]
    NothingToAbort,
    #[error("{0} is the root the mesh already uses: give the new root")]
    SameRoot(std::path::PathBuf),
}

/// What every mesh watch carries besides the mesh state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustView {
    pub bundle_pem: Arc<Vec<String>>,
    pub renew: Option<RenewRequest>,
    /// Fingerprint of the intermediate that signs now.
    pub issuing_intermediate: String,
}

/// One move between phases: an audit line and a metric.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Transition {
    pub kind: Kind,
    pub from: Phase,
    pub to: Phase,
    pub trigger: Trigger,
    pub issuing_root: String,
    pub issuing_intermediate: String,
    pub trusted_roots: Vec<String>,
}

/// The keys of a CA that rotates its own: the current set, the next one during a rotation,
/// and where they are kept.
struct Keys {
    store: Box<dyn KeyStore + Send>,
    current: KeySet,
    next: Option<KeySet>,
    record: Option<Record>,
    lagging_reported: bool,
}

impl Keys {
    fn phase(&self) -> Phase {
        self.record.as_ref().map_or(Phase::Idle, |r| r.phase)
    }

    fn next(&self) -> &KeySet {
        self.next
            .as_ref()
            .expect("a rotation under way has its next set")
    }

    /// The set that signs, and the other roots the bundle holds, in this phase.
    fn signing(&self) -> (&KeySet, Vec<&CertificateDer<'static>>) {
        match self.phase() {
            Phase::Idle => (&self.current, vec![]),
            Phase::Trusting => (&self.current, vec![&self.next().root]),
            Phase::Issuing => (self.next(), vec![&self.current.root]),
            Phase::Retiring => (self.next(), vec![]),
        }
    }
}

pub struct Rotation {
    /// `None` for an operator's CA: nothing to rotate here.
    keys: Mutex<Option<Keys>>,
    authority: ArcSwap<Authority>,
    trust: watch::Sender<TrustView>,
    pub registry: ProxyRegistry,
    settings: Settings,
    trust_domain: String,
    extra_roots: Vec<CertificateDer<'static>>,
    /// Unix seconds.
    started_at: i64,
    metrics: Arc<Metrics>,
    /// Why this CA cannot rotate, when it cannot.
    unsupported: Option<&'static str>,
    /// A rotation completed while the CA started, to be audited by [`run`].
    finished_at_start: Mutex<Option<Transition>>,
    /// The registry's change count when it was last saved.
    saved_reports: std::sync::atomic::AtomicU64,
    /// The state directory's lock, held while this CA runs.
    lock: Mutex<Option<std::fs::File>>,
    /// When a CA without its root's key last said that only the operator can rotate.
    offline_reminder: operator::OfflineRootReminder,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation").finish_non_exhaustive()
    }
}

impl Rotation {
    /// Loads (or makes) the generated root and intermediate in `store` and resumes a rotation
    /// found there: one left in `retiring` is finished first, and `next-*` entries without a
    /// record (a start that did not complete) are removed.
    pub fn open(
        mut store: Box<dyn KeyStore + Send>,
        trust_domain: &str,
        settings: Settings,
        extra_roots: Vec<CertificateDer<'static>>,
        metrics: Arc<Metrics>,
        now: OffsetDateTime,
    ) -> Result<Self, RotationError> {
        let mut record = keyset::read_record(&*store)?;
        let mut finished = None;
        if let Some(r) = record.clone().filter(|r| r.phase == Phase::Retiring) {
            let set = keyset::promote(&mut *store, now)?;
            tracing::info!("finished the rotation that was retiring when the CA stopped");
            finished = Some(Transition {
                kind: r.kind,
                from: Phase::Retiring,
                to: Phase::Idle,
                trigger: r.trigger,
                issuing_root: set.root_fingerprint(),
                issuing_intermediate: set.intermediate_fingerprint(),
                trusted_roots: vec![set.root_fingerprint()],
            });
            record = None;
        }
        if record.is_none() && keyset::any_present(&*store, &NEXT)? {
            keyset::remove(&mut *store, &NEXT)?;
            tracing::info!("removed the keys of a rotation whose start did not complete");
        }
        if !operator::root_key_offline(&*store, now)? {
            load_or_create_generated(&mut *store, trust_domain, &settings.lifetimes, now)?;
        }
        let current = KeySet::load(&*store, &CURRENT, now)?;
        let next = match &record {
            Some(_) => Some(KeySet::load(&*store, &NEXT, now)?),
            None => None,
        };
        if let Some(r) = &record {
            tracing::info!(
                kind = r.kind.as_str(),
                phase = r.phase.as_str(),
                "resuming the rotation"
            );
        }
        let keys = Keys {
            store,
            current,
            next,
            record,
            lagging_reported: false,
        };
        let saved = match &keys.record {
            Some(_) => keys.store.read(keyset::PROXIES_FILE, false)?,
            None => None,
        };
        let (authority, view) = build(&keys, &extra_roots, settings.renew_window)?;
        let rotation = Self::assemble(
            Some(keys),
            authority,
            view,
            trust_domain,
            settings,
            extra_roots,
            metrics,
            None,
            now,
        );
        if let Some(text) = saved {
            rotation.registry.restore(&text);
        }
        *rotation
            .finished_at_start
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = finished;
        Ok(rotation)
    }

    /// A CA whose keys are given (an operator's root or intermediate):
    /// always `idle`; proxies are still heard, for the fleet's figures.
    pub fn fixed(
        material: KeyMaterial,
        trust_domain: &str,
        settings: Settings,
        extra_roots: Vec<CertificateDer<'static>>,
        metrics: Arc<Metrics>,
        why: &'static str,
        now: OffsetDateTime,
    ) -> Result<Self, RotationError> {
        let authority = Authority::new(material, extra_roots.clone())?;
        let view = TrustView {
            bundle_pem: Arc::new(authority.trust_bundle_pem().to_vec()),
            renew: None,
            issuing_intermediate: sha256_fingerprint(&authority.chain_tail_der()[0]),
        };
        Ok(Self::assemble(
            None,
            authority,
            view,
            trust_domain,
            settings,
            extra_roots,
            metrics,
            Some(why),
            now,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        keys: Option<Keys>,
        authority: Authority,
        view: TrustView,
        trust_domain: &str,
        settings: Settings,
        extra_roots: Vec<CertificateDer<'static>>,
        metrics: Arc<Metrics>,
        unsupported: Option<&'static str>,
        now: OffsetDateTime,
    ) -> Self {
        let phase = keys.as_ref().map_or(Phase::Idle, Keys::phase);
        metrics.set_keys(
            phase,
            authority.root_not_after().unix_timestamp(),
            authority.intermediate_not_after().unix_timestamp(),
        );
        Rotation {
            keys: Mutex::new(keys),
            authority: ArcSwap::from_pointee(authority),
            trust: watch::Sender::new(view),
            registry: ProxyRegistry::default(),
            settings,
            trust_domain: trust_domain.to_owned(),
            extra_roots,
            started_at: now.unix_timestamp(),
            metrics,
            unsupported,
            finished_at_start: Mutex::new(None),
            saved_reports: std::sync::atomic::AtomicU64::new(u64::MAX),
            lock: Mutex::new(None),
            offline_reminder: Default::default(),
        }
    }

    /// Keeps the state directory's lock for as long as this rotation lives.
    pub fn hold(self, lock: std::fs::File) -> Self {
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
        self
    }

    /// What signs now. Hold the `Arc` for one request: a swap never changes it mid-way.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.load_full()
    }

    pub fn subscribe(&self) -> watch::Receiver<TrustView> {
        self.trust.subscribe()
    }

    /// Which of our intermediates signed `leaf`: its fingerprint.
    pub fn issuer_of(&self, leaf: &CertificateDer<'_>) -> Option<String> {
        let keys = self.lock();
        match keys.as_ref() {
            Some(k) => [Some(&k.current), k.next.as_ref()]
                .into_iter()
                .flatten()
                .find(|set| set.issued(leaf))
                .map(KeySet::intermediate_fingerprint),
            None => {
                let authority = self.authority();
                let intermediate = authority.chain_tail_der().first()?;
                crate::keys::issued_by(leaf, intermediate).then(|| sha256_fingerprint(intermediate))
            }
        }
    }

    /// Starts a rotation of `kind`: the next set is written, then the record.
    pub fn begin(
        &self,
        kind: Kind,
        trigger: Trigger,
        now: OffsetDateTime,
    ) -> Result<Transition, RotationError> {
        self.begin_with(kind, trigger, None, now)
    }

    /// Starts a root rotation to an operator's root (certificate and key files the CA can
    /// read); the CA makes the intermediate under it.
    pub fn begin_with_root(
        &self,
        cert: &std::path::Path,
        key: &std::path::Path,
        now: OffsetDateTime,
    ) -> Result<Transition, RotationError> {
        // Read and checked before the lock: watches wait on it, files may be slow.
        let set = KeySet::from_root_files(cert, key, &self.trust_domain, &self.settings, now)?;
        let in_use = self
            .lock()
            .as_ref()
            .is_some_and(|k| k.current.root == set.root);
        if in_use {
            return Err(RotationError::SameRoot(cert.to_path_buf()));
        }
        self.begin_with(Kind::Root, Trigger::Manual, Some(set), now)
    }

    fn begin_with(
        &self,
        kind: Kind,
        trigger: Trigger,
        prepared: Option<KeySet>,
        now: OffsetDateTime,
    ) -> Result<Transition, RotationError> {
        let mut guard = self.lock();
        let Some(keys) = guard.as_mut() else {
            return Err(RotationError::Unsupported(
                self.unsupported.unwrap_or("its keys are not its own"),
            ));
        };
        if let Some(r) = &keys.record {
            return Err(RotationError::Running {
                kind: r.kind.as_str(),
                phase: r.phase.as_str(),
            });
        }
        let lifetimes = &self.settings.lifetimes;
        let next = match (kind, prepared) {
            (_, Some(set)) => set,
            (Kind::Root, None) => KeySet::generate_root(&self.trust_domain, lifetimes, now)?,
            (Kind::Intermediate, _) => {
                keys.current
                    .with_new_intermediate(&self.trust_domain, lifetimes, now)?
            }
        };
        next.save(&mut *keys.store, &NEXT)?;
        let phase = match kind {
            Kind::Root => Phase::Trusting,
            Kind::Intermediate => Phase::Issuing,
        };
        let record = Record {
            kind,
            phase,
            trigger,
            started_at: now.unix_timestamp(),
            phase_started_at: now.unix_timestamp(),
        };
        keyset::write_record(&mut *keys.store, Some(&record))?;
        keys.next = Some(next);
        keys.record = Some(record);
        keys.lagging_reported = false;
        self.apply(keys, Phase::Idle, phase, (kind, trigger))
    }

    /// Abandons a root rotation that is still `trusting` (nothing signed by the new root yet):
    /// the new keys go, and the bundle is the old root alone again.
    pub fn abort(&self) -> Result<Transition, RotationError> {
        let mut guard = self.lock();
        let Some(keys) = guard.as_mut() else {
            return Err(RotationError::Unsupported(
                self.unsupported.unwrap_or("its keys are not its own"),
            ));
        };
        let record = match keys.record.clone() {
            Some(r) if r.phase == Phase::Trusting => r,
            Some(r) => return Err(RotationError::TooLateToAbort(r.phase.as_str())),
            None => return Err(RotationError::NothingToAbort),
        };
        keyset::write_record(&mut *keys.store, None)?;
        keyset::remove(&mut *keys.store, &NEXT)?;
        keys.store.remove(keyset::PROXIES_FILE)?;
        keys.next = None;
        keys.record = None;
        tracing::warn!("root rotation abandoned: the new root is removed from the bundle");
        self.apply(
            keys,
            Phase::Trusting,
            Phase::Idle,
            (record.kind, Trigger::Manual),
        )
    }

    /// The rotation finished while the CA started, once.
    pub fn take_finished_at_start(&self) -> Option<Transition> {
        self.finished_at_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// One look at the fleet and, when its condition holds, one move to the next phase.
    pub fn step(
        &self,
        state: &crate::mesh::MeshState,
        now: OffsetDateTime,
    ) -> Result<Option<Transition>, RotationError> {
        let unix = now.unix_timestamp();
        self.registry.prune(state, unix);
        let reports = self.registry.snapshot();
        let bundle = self.bundle_fingerprints();
        let lagging = registry::lagging(&reports, &bundle);
        self.metrics
            .set_fleet(lagging.len(), registry::mesh_expiry(&reports));
        let mut guard = self.lock();
        let Some(keys) = guard.as_mut() else {
            return Ok(None);
        };
        let Some(record) = keys.record.clone() else {
            drop(guard);
            return match self.due(now) {
                Some(kind) => self.begin(kind, Trigger::Automatic, now).map(Some),
                None => Ok(None),
            };
        };
        self.save_reports(keys)?;
        // Proxies reconnect within their backoff after a restart: nothing is decided on an
        // empty hearing.
        let settled = unix - record.phase_started_at >= self.settings.settle.whole_seconds()
            && unix - self.started_at >= self.settings.reconnect_grace.whole_seconds();
        let next = match record.phase {
            Phase::Trusting if lagging.is_empty() && settled => Phase::Issuing,
            Phase::Trusting => {
                let passed = self.deadline(&record).is_some_and(|d| unix >= d);
                if passed && !keys.lagging_reported {
                    keys.lagging_reported = true;
                    let names: Vec<String> = lagging.iter().take(20).map(|r| describe(r)).collect();
                    tracing::warn!(lagging = lagging.len(), proxies = ?names,
                        "root rotation: these proxies have not confirmed the two-root bundle; the rotation waits for them (or for their certificates to expire)");
                }
                return Ok(None);
            }
            Phase::Issuing => {
                let old = registry::on_previous(&reports, &keys.next().intermediate_fingerprint());
                let passed = self.deadline(&record).is_some_and(|d| unix >= d);
                if (old.is_empty() && settled) || passed {
                    Phase::Retiring
                } else {
                    return Ok(None);
                }
            }
            Phase::Retiring => {
                keys.current = keyset::promote(&mut *keys.store, now)?;
                keys.next = None;
                keys.record = None;
                tracing::info!(
                    kind = record.kind.as_str(),
                    "rotation complete: the previous keys are destroyed"
                );
                let why = (record.kind, record.trigger);
                return self
                    .apply(keys, Phase::Retiring, Phase::Idle, why)
                    .map(Some);
            }
            Phase::Idle => return Ok(None),
        };
        let from = record.phase;
        let why = (record.kind, record.trigger);
        let record = Record {
            phase: next,
            phase_started_at: unix,
            ..record
        };
        keyset::write_record(&mut *keys.store, Some(&record))?;
        keys.record = Some(record);
        self.apply(keys, from, next, why).map(Some)
    }

    /// Keeps what proxies reported with the keys while a rotation runs (when it changed).
    fn save_reports(&self, keys: &mut Keys) -> Result<(), KeyError> {
        use std::sync::atomic::Ordering;
        let changes = self.registry.changes();
        if self.saved_reports.swap(changes, Ordering::Relaxed) != changes {
            keys.store
                .write(keyset::PROXIES_FILE, &self.registry.save(), false)?;
        }
        Ok(())
    }

    /// The phase's deadline (Unix seconds): in `trusting`, when lagging proxies are named; in
    /// `issuing`, when no leaf of the previous intermediate can still be valid.
    fn deadline(&self, record: &Record) -> Option<i64> {
        let after = match record.phase {
            Phase::Trusting => self.settings.trust_deadline,
            Phase::Issuing => self.settings.max_leaf_lifetime + BACKDATE,
            Phase::Idle | Phase::Retiring => return None,
        };
        Some(record.phase_started_at + after.whole_seconds())
    }

    /// Which rotation the schedule asks for now, if automation is on.
    fn due(&self, now: OffsetDateTime) -> Option<Kind> {
        if self.offline_root_due(now) {
            return None;
        }
        if !self.settings.automatic {
            return None;
        }
        let guard = self.lock();
        let keys = guard.as_ref()?;
        let passed = |der: &CertificateDer<'_>, percent: i64| {
            serial_and_validity(der).is_ok_and(|(_, nb, na)| {
                let life = (na - nb).whole_seconds();
                (now - nb).whole_seconds() * 100 >= life * percent
            })
        };
        if passed(
            &keys.current.root,
            self.settings.root_rotate_at_percent.into(),
        ) {
            Some(Kind::Root)
        } else if passed(&keys.current.intermediate, 50) {
            Some(Kind::Intermediate)
        } else {
            None
        }
    }

    /// Swaps in the authority of `keys`' phase and tells every watch.
    fn apply(
        &self,
        keys: &Keys,
        from: Phase,
        to: Phase,
        (kind, trigger): (Kind, Trigger),
    ) -> Result<Transition, RotationError> {
        let (authority, view) = build(keys, &self.extra_roots, self.settings.renew_window)?;
        self.metrics.set_keys(
            to,
            authority.root_not_after().unix_timestamp(),
            authority.intermediate_not_after().unix_timestamp(),
        );
        let (issuing, _) = keys.signing();
        let transition = Transition {
            kind,
            from,
            to,
            trigger,
            issuing_root: issuing.root_fingerprint(),
            issuing_intermediate: issuing.intermediate_fingerprint(),
            trusted_roots: fingerprints(authority.roots()),
        };
        self.authority.store(Arc::new(authority));
        self.trust.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        self.metrics
            .rotation_transition(transition.kind.as_str(), to.as_str());
        tracing::info!(kind = transition.kind.as_str(), from = from.as_str(), to = to.as_str(),
            trusted_roots = ?transition.trusted_roots, issuing_root = %transition.issuing_root, "rotation phase");
        Ok(transition)
    }

    fn bundle_fingerprints(&self) -> Vec<String> {
        fingerprints(self.authority().roots())
    }

    pub fn status(&self) -> RotationStatus {
        let reports = self.registry.snapshot();
        let authority = self.authority();
        let bundle = fingerprints(authority.roots());
        let lagging = registry::lagging(&reports, &bundle);
        let guard = self.lock();
        let keys = guard.as_ref();
        let record = keys.and_then(|k| k.record.clone());
        let issuing_intermediate = sha256_fingerprint(&authority.chain_tail_der()[0]);
        let deadline = record.as_ref().and_then(|r| self.deadline(r));
        RotationStatus {
            phase: record
                .as_ref()
                .map_or(Phase::Idle, |r| r.phase)
                .as_str()
                .into(),
            kind: record.as_ref().map(|r| r.kind.as_str().into()),
            issuing_root: authority
                .roots()
                .first()
                .map(|r| sha256_fingerprint(r))
                .unwrap_or_default(),
            trusted_roots: bundle,
            proxies: ProxyCounts {
                total: reports.len(),
                confirmed: reports.len() - lagging.len(),
                lagging: lagging
                    .iter()
                    .map(|r| LaggingProxy {
                        pod: r.pod.clone(),
                        spiffe_id: r.spiffe_id.clone(),
                    })
                    .collect(),
            },
            leaves_on_previous_root: registry::on_previous(&reports, &issuing_intermediate).len(),
            issuing_intermediate,
            started_at: record.as_ref().map(|r| rfc3339(r.started_at)),
            deadline: deadline.map(rfc3339),
            root_expires_at: rfc3339(authority.root_not_after().unix_timestamp()),
            intermediate_expires_at: rfc3339(authority.intermediate_not_after().unix_timestamp()),
            mesh_expires_at: registry::mesh_expiry(&reports).map(rfc3339),
            rotatable: keys.is_some(),
            root_key_held: keys.is_some_and(|k| k.signing().0.root_key_held()),
            automatic: self.settings.automatic && keys.is_some(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Keys>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The authority and the watch's view for `keys`' phase.
fn build(
    keys: &Keys,
    extra_roots: &[CertificateDer<'static>],
    renew_window: time::Duration,
) -> Result<(Authority, TrustView), KeyError> {
    let (issuing, others) = keys.signing();
    let mut extra: Vec<CertificateDer<'static>> = others.into_iter().cloned().collect();
    extra.extend(extra_roots.iter().cloned());
    let authority = Authority::new(issuing.material()?, extra)?;
    let renew = (keys.phase() == Phase::Issuing).then(|| RenewRequest {
        unless_issued_by: issuing.intermediate_fingerprint(),
        within_seconds: renew_window.whole_seconds().max(0) as u64,
    });
    let view = TrustView {
        bundle_pem: Arc::new(authority.trust_bundle_pem().to_vec()),
        renew,
        issuing_intermediate: issuing.intermediate_fingerprint(),
    };
    Ok((authority, view))
}

fn fingerprints(roots: &[CertificateDer<'static>]) -> Vec<String> {
    roots.iter().map(|r| sha256_fingerprint(r)).collect()
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn describe(r: &registry::WatchReport) -> String {
    match &r.pod {
        Some(pod) => format!("{pod} ({})", r.spiffe_id),
        None => r.spiffe_id.clone(),
    }
}
