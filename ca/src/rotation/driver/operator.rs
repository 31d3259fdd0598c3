//! An intermediate signed by an operator's root that stays offline (`palisade-ca rotate
//! intermediate --from-cert F --from-key F --chain F`): what is checked before anything
//! changes, which rotation it starts, and what a CA that does not hold its root's key does
//! instead of rotating on schedule (it cannot make an intermediate itself).

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use palisade_ca_api::cert::serial_and_validity;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{Rotation, RotationError, Transition};
use crate::keys::{
    KeyError, KeyStore, issued_by, not_after, parse_ca_cert, parse_certs, parse_key_for,
};
use crate::rotation::keyset::{CURRENT, KeySet, copy_key, read_operator_file};
use crate::rotation::{Kind, Settings, Trigger};

/// The least life an operator's intermediate must have left to be rotated to.
pub const MIN_OPERATOR_INTERMEDIATE_LIFE: time::Duration = time::Duration::days(7);

/// How often the reminder that only the operator can rotate is repeated.
const REMIND_EVERY: i64 = 3600;

impl Rotation {
    /// Starts a rotation to an operator's intermediate, whose root's key the CA never sees.
    /// Under the current root it is an intermediate rotation; under another root, a root
    /// rotation to that root (without its key) and this intermediate.
    pub fn begin_with_intermediate(
        &self,
        cert: &Path,
        key: &Path,
        chain: &Path,
        now: OffsetDateTime,
    ) -> Result<Transition, RotationError> {
        // Read and checked before the lock: watches wait on it, files may be slow.
        let offered = KeySet::from_intermediate_files(
            cert,
            key,
            chain,
            &self.trust_domain,
            &self.settings,
            now,
        )?;
        let (kind, next) = match self.lock().as_ref() {
            Some(keys) => next_set(&keys.current, offered, cert)?,
            // Refused as not rotatable by `begin_with`.
            None => (Kind::Intermediate, offered),
        };
        self.begin_with(kind, Trigger::Manual, Some(next), now)
    }

    /// Whether the current root's key is not held: then nothing starts on schedule (a
    /// generated intermediate or root would replace the operator's), and once the
    /// intermediate (or the root) is due, a warning says what to run, at most once an hour.
    pub(super) fn offline_root_due(&self, now: OffsetDateTime) -> bool {
        let guard = self.lock();
        let Some(keys) = guard.as_ref().filter(|k| !k.current.root_key_held()) else {
            return false;
        };
        let current = &keys.current;
        let intermediate_due = passed(&current.intermediate, 50, now);
        let root_due = passed(
            &current.root,
            self.settings.root_rotate_at_percent.into(),
            now,
        );
        if (intermediate_due || root_due) && self.offline_reminder.due(now) {
            let expires =
                |der: &CertificateDer<'_>| not_after(der).map_or_else(|e| e, |t| t.to_string());
            if intermediate_due {
                tracing::warn!(intermediate_expires_at = %expires(&current.intermediate),
                    "the intermediate has passed half its life, and this CA does not hold its root's key (an operator's root kept offline), so it does not rotate it: sign a new intermediate with that root and run `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`");
            }
            if root_due {
                tracing::warn!(root_expires_at = %expires(&current.root),
                    "the root has passed its rotation point, and this CA does not hold its key, so it does not replace it: run `palisade-ca rotate intermediate --from-cert F --from-key F --chain F` with an intermediate of your next root, or `palisade-ca rotate root`");
            }
        }
        true
    }
}

/// When the last reminder was given (Unix seconds; 0: never).
#[derive(Debug, Default)]
pub(super) struct OfflineRootReminder(AtomicI64);

impl OfflineRootReminder {
    /// Whether a reminder is due now; if so, it counts as given.
    fn due(&self, now: OffsetDateTime) -> bool {
        let now = now.unix_timestamp();
        let last = self.0.load(Ordering::Relaxed);
        let due = last == 0 || now - last >= REMIND_EVERY;
        due && self
            .0
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Whether `percent` of `der`'s life has passed.
fn passed(der: &CertificateDer<'_>, percent: i64, now: OffsetDateTime) -> bool {
    serial_and_validity(der).is_ok_and(|(_, nb, na)| {
        let life = (na - nb).whole_seconds();
        (now - nb).whole_seconds() * 100 >= life * percent
    })
}

/// The next set for `offered` given the current one, and the rotation it makes.
fn next_set(
    current: &KeySet,
    mut offered: KeySet,
    cert: &Path,
) -> Result<(Kind, KeySet), KeyError> {
    if offered.root != current.root {
        return Ok((Kind::Root, offered));
    }
    if offered.intermediate == current.intermediate {
        return Err(KeyError::Parse(
            cert.into(),
            "it is the intermediate the CA signs with now, so there is nothing to rotate: give the new intermediate".into(),
        ));
    }
    // The same root: a key the CA holds for it stays.
    offered.root_key = current.root_key.as_ref().map(copy_key).transpose()?;
    Ok((Kind::Intermediate, offered))
}

impl KeySet {
    /// An operator's intermediate (certificate and key files) and the chain above it, whose
    /// root's key stays offline. This version takes a chain of exactly one certificate: the
    /// self-signed root that issued the intermediate. The intermediate must be a CA
    /// certificate whose key is the one given, valid now with at least
    /// [`MIN_OPERATOR_INTERMEDIATE_LIFE`] left and no later end than its root, and a leaf and
    /// the CA's serving certificate signed with it must verify the way proxies verify them.
    /// The files are read as they are: bounded, and their permissions left alone.
    pub fn from_intermediate_files(
        cert: &Path,
        key: &Path,
        chain: &Path,
        trust_domain: &str,
        settings: &Settings,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let intermediate = parse_ca_cert(cert, &read_operator_file(cert)?, now)
            .map_err(|e| expired_means(e, "give an intermediate with at least 7 days left"))?;
        let intermediate_key = parse_key_for(key, &read_operator_file(key)?, cert, &intermediate)?;
        let chain_text = read_operator_file(chain)?;
        let above = parse_certs(chain, &chain_text)?;
        if above.first() == Some(&intermediate) {
            return Err(KeyError::Chain(
                chain.into(),
                "it starts with the intermediate itself: give only the certificates above it (its issuer first, the root last)".into(),
            ));
        }
        if above.len() != 1 {
            return Err(KeyError::Chain(
                chain.into(),
                format!(
                    "it holds {} certificates; this version takes exactly one, the self-signed root that issued the intermediate directly (an intermediate under another intermediate is not supported yet)",
                    above.len()
                ),
            ));
        }
        let root = parse_ca_cert(chain, &chain_text, now).map_err(|e| {
            expired_means(
                e,
                "nothing under an expired root verifies: give an intermediate of a valid root",
            )
        })?;
        if !issued_by(&root, &root) {
            return Err(KeyError::Chain(
                chain.into(),
                "its certificate is not self-signed: this version takes the root alone, directly above the intermediate".into(),
            ));
        }
        if !issued_by(&intermediate, &root) {
            return Err(KeyError::Chain(
                cert.into(),
                format!(
                    "it was not issued by the root in {}: give the root that signed it",
                    chain.display()
                ),
            ));
        }
        let ends = not_after(&intermediate).map_err(|e| KeyError::Parse(cert.into(), e))?;
        let root_ends = not_after(&root).map_err(|e| KeyError::Parse(chain.into(), e))?;
        let left = ends - now;
        if left < MIN_OPERATOR_INTERMEDIATE_LIFE {
            return Err(KeyError::Parse(
                cert.into(),
                format!(
                    "it expires in {} days; give an intermediate with at least {} days left",
                    left.whole_days(),
                    MIN_OPERATOR_INTERMEDIATE_LIFE.whole_days()
                ),
            ));
        }
        if ends > root_ends {
            return Err(KeyError::Parse(
                cert.into(),
                format!(
                    "it ends at {ends}, after its root ({root_ends}), and leaves under it would stop verifying when the root expires: issue it to end no later than the root"
                ),
            ));
        }
        let set = KeySet {
            root,
            root_key: None,
            intermediate,
            intermediate_key,
        };
        set.check_signs_verifiable_leaves(cert, trust_domain, &settings.serving_name, now)?;
        Ok(set)
    }
}

/// An expired certificate's error with the fix that fits here.
fn expired_means(e: KeyError, fix: &str) -> KeyError {
    match e {
        KeyError::Expired(path, at) => KeyError::Parse(path, format!("it expired at {at}; {fix}")),
        e => e,
    }
}

/// Whether the current set in `store` is an operator's intermediate under a root whose key is
/// not held (a root certificate, an intermediate, no root key, and the note that says so). Said once at start: the CA
/// then never makes an intermediate or a root itself, so only the operator rotates them.
pub(super) fn root_key_offline(
    store: &(impl KeyStore + ?Sized),
    now: OffsetDateTime,
) -> Result<bool, KeyError> {
    if store.read(CURRENT.root_cert, false)?.is_none()
        || store.read(CURRENT.root_key, true)?.is_some()
        || store.read(CURRENT.root_key_offline, false)?.is_none()
    {
        return Ok(false);
    }
    let Some(text) = store.read(CURRENT.intermediate_cert, false)? else {
        return Ok(false);
    };
    let label = store.label(CURRENT.intermediate_cert);
    let ends = parse_certs(&label, &text)
        .ok()
        .and_then(|c| not_after(&c[0]).ok());
    match ends {
        Some(ends) if ends <= now => tracing::error!(intermediate_expires_at = %ends,
            "the intermediate has expired and this CA does not hold its root's key: sign a new intermediate with that root and run `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`"),
        _ => tracing::info!(intermediate_expires_at = ?ends,
            "this CA does not hold its root's key (an operator's root kept offline): it will not rotate the intermediate or the root by itself; replace the intermediate with `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`"),
    }
    Ok(true)
}
