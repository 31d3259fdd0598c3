//! A root and the intermediate it issued, as entries of a [`KeyStore`]: the current set under
//! the names the CA has always used, the next one under `next-*` names, and the rotation's
//! phase in `rotation.json`. Every change writes the entries first and the record last; the
//! record is what a restart believes.

use palisade_ca_api::cert::{cert_to_pem, sha256_fingerprint};
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::Record;
use crate::keys::{
    INTERMEDIATE_CERT_FILE, INTERMEDIATE_KEY_FILE, KeyError, KeyMaterial, KeyStore, Lifetimes,
    ROOT_CERT_FILE, ROOT_KEY_FILE, generate_intermediate, generate_root, issued_by, material,
    parse_ca_cert, parse_certs, parse_key_for,
};

/// The rotation's record; present only while a rotation runs.
pub const ROTATION_FILE: &str = "rotation.json";
/// What proxies reported, kept while a rotation runs so that a restart still waits for them.
pub const PROXIES_FILE: &str = "rotation-proxies.json";
/// Locked by the CA that serves from a state directory, so that an offline command (the
/// emergency path) never rewrites keys under a running CA.
pub const LOCK_FILE: &str = "ca.lock";

/// Takes the state directory's lock, or says who holds it.
pub fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another palisade-ca is using {} (it holds {}): stop it first",
            dir.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// The entry names of one set.
pub struct Names {
    pub root_cert: &'static str,
    pub root_key: &'static str,
    /// Present instead of `root_key` when the root's key is kept offline by its operator: a
    /// root key that is merely missing is a lost key, never taken for an offline one.
    pub root_key_offline: &'static str,
    pub intermediate_cert: &'static str,
    pub intermediate_key: &'static str,
}

pub const CURRENT: Names = Names {
    root_cert: ROOT_CERT_FILE,
    root_key: ROOT_KEY_FILE,
    root_key_offline: "root-key-offline",
    intermediate_cert: INTERMEDIATE_CERT_FILE,
    intermediate_key: INTERMEDIATE_KEY_FILE,
};

pub const NEXT: Names = Names {
    root_cert: "next-root.pem",
    root_key: "next-root-key.pem",
    root_key_offline: "next-root-key-offline",
    intermediate_cert: "next-intermediate.pem",
    intermediate_key: "next-intermediate-key.pem",
};

/// A root, its key, and the intermediate it issued with that key. The root's key is absent
/// for an operator's root kept offline: the intermediate then came from the operator too.
pub struct KeySet {
    pub root: CertificateDer<'static>,
    pub(super) root_key: Option<KeyPair>,
    pub intermediate: CertificateDer<'static>,
    pub(super) intermediate_key: KeyPair,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("root", &self.root_fingerprint())
            .field("intermediate", &self.intermediate_fingerprint())
            .finish_non_exhaustive()
    }
}

impl KeySet {
    /// A new root and a new intermediate under it.
    pub fn generate_root(
        trust_domain: &str,
        lifetimes: &Lifetimes,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let (root, root_key) = generate_root(trust_domain, lifetimes.root, now)?;
        let (intermediate, intermediate_key) =
            generate_intermediate(&root, &root_key, trust_domain, lifetimes.intermediate, now)?;
        Ok(KeySet {
            root,
            root_key: Some(root_key),
            intermediate,
            intermediate_key,
        })
    }

    /// An operator's root (its certificate and key files) and a new intermediate under it.
    /// The root must be a valid, self-signed CA certificate whose key is the one given, with at
    /// least [`MIN_OPERATOR_ROOT_LIFE`] left, and a leaf signed under it must verify the way
    /// the proxies verify one (a name constraint or an algorithm they cannot check would
    /// otherwise surface only once it signs, when the rotation can no longer be abandoned).
    /// The files are read as they are: bounded, and their permissions left alone.
    pub fn from_root_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        trust_domain: &str,
        settings: &super::Settings,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let lifetimes = &settings.lifetimes;
        let root = parse_ca_cert(cert, &read_operator_file(cert)?, now)?;
        if !issued_by(&root, &root) {
            return Err(KeyError::Chain(
                cert.into(),
                "a root must be self-signed; for an intermediate under an offline root, run `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`".into(),
            ));
        }
        let left =
            crate::keys::not_after(&root).map_err(|e| KeyError::Parse(cert.into(), e))? - now;
        if left < MIN_OPERATOR_ROOT_LIFE {
            return Err(KeyError::Parse(
                cert.into(),
                format!(
                    "it expires in {} days; give a root with at least {} days left",
                    left.whole_days(),
                    MIN_OPERATOR_ROOT_LIFE.whole_days()
                ),
            ));
        }
        let root_key = parse_key_for(key, &read_operator_file(key)?, cert, &root)?;
        let (intermediate, intermediate_key) =
            generate_intermediate(&root, &root_key, trust_domain, lifetimes.intermediate, now)?;
        let set = KeySet {
            root,
            root_key: Some(root_key),
            intermediate,
            intermediate_key,
        };
        set.check_signs_verifiable_leaves(cert, trust_domain, &settings.serving_name, now)?;
        Ok(set)
    }

    /// Signs a throwaway workload leaf and a throwaway CA serving certificate under this set,
    /// and verifies each as a proxy would (the serving one against `serving_name`).
    pub(super) fn check_signs_verifiable_leaves(
        &self,
        label: &std::path::Path,
        trust_domain: &str,
        serving_name: &str,
        now: OffsetDateTime,
    ) -> Result<(), KeyError> {
        let refused = |why: String| {
            KeyError::Chain(
                label.into(),
                format!(
                    "a leaf signed under this root does not verify as the proxies verify it: {why}"
                ),
            )
        };
        let authority = crate::authority::Authority::new(self.material()?, Vec::new())?;
        let id = palisade_ca_api::SpiffeId::new(trust_domain, "palisade-system", "rotation-check")
            .map_err(|e| refused(e.to_string()))?;
        let key = KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let leaf = authority
            .issue_leaf(&spki, &id, time::Duration::minutes(5), now)
            .map_err(|e| refused(e.to_string()))?;
        let chain = vec![leaf.der, self.intermediate.clone()];
        let verify_at = rustls_pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(now.unix_timestamp().max(0) as u64),
        );
        palisade_ca_api::tls::verify_workload_chain(authority.root_store(), &chain, verify_at)
            .map_err(|e| refused(e.to_string()))?;

        let ca_id = palisade_ca_api::SpiffeId::new(
            trust_domain,
            "palisade-system",
            palisade_ca_api::contract::CA_SERVICE_ACCOUNT,
        )
        .map_err(|e| refused(e.to_string()))?;
        let serving = authority
            .issue_server(
                &ca_id,
                &[serving_name.to_owned()],
                &key,
                time::Duration::minutes(5),
                now,
            )
            .map_err(|e| refused(e.to_string()))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            authority.root_store(),
            palisade_ca_api::tls::crypto_provider(),
        )
        .build()
        .map_err(|e| refused(e.to_string()))?;
        let name = rustls_pki_types::ServerName::try_from(serving_name.to_owned())
            .map_err(|e| refused(e.to_string()))?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &serving.der,
                std::slice::from_ref(&self.intermediate),
                &name,
                &[],
                verify_at,
            )
            .map(|_| ())
            .map_err(|e| refused(format!("the CA's own certificate for {serving_name}: {e}")))
    }

    /// The same root with a new intermediate; only when the root's key is held.
    pub fn with_new_intermediate(
        &self,
        trust_domain: &str,
        lifetimes: &Lifetimes,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let root_key = self.root_key.as_ref().ok_or(KeyError::RootKeyOffline)?;
        let (intermediate, intermediate_key) = generate_intermediate(
            &self.root,
            root_key,
            trust_domain,
            lifetimes.intermediate,
            now,
        )?;
        Ok(KeySet {
            root: self.root.clone(),
            root_key: Some(copy_key(root_key)?),
            intermediate,
            intermediate_key,
        })
    }

    /// Reads and checks a set: both pairs match, the root issued the intermediate, and the
    /// root is valid now (the intermediate may have expired: it is then replaced). The root's
    /// key may be absent (an operator's root kept offline); when present it must match.
    pub fn load(
        store: &(impl KeyStore + ?Sized),
        names: &Names,
        now: OffsetDateTime,
    ) -> Result<Self, KeyError> {
        let read = |name: &str, private: bool| -> Result<String, KeyError> {
            store
                .read(name, private)?
                .ok_or_else(|| KeyError::RotationIncomplete {
                    record: store.label(ROTATION_FILE),
                    missing: store.label(name),
                })
        };
        let root_label = store.label(names.root_cert);
        let root = parse_ca_cert(&root_label, &read(names.root_cert, false)?, now)?;
        let root_key = match store.read(names.root_key, true)? {
            Some(text) => Some(parse_key_for(
                &store.label(names.root_key),
                &text,
                &root_label,
                &root,
            )?),
            None if store.read(names.root_key_offline, false)?.is_some() => None,
            None => {
                return Err(KeyError::Parse(
                    store.label(names.root_key),
                    format!(
                        "missing: the root's key is gone, and {} does not say it is kept offline; restore it from a backup (or, as a last resort, palisade-ca rotate root --emergency)",
                        store.label(names.root_key_offline).display()
                    ),
                ));
            }
        };
        let intermediate_label = store.label(names.intermediate_cert);
        let intermediate =
            parse_certs(&intermediate_label, &read(names.intermediate_cert, false)?)?.remove(0);
        if !issued_by(&intermediate, &root) {
            return Err(KeyError::Chain(
                intermediate_label,
                format!("it was not issued by {}", root_label.display()),
            ));
        }
        let intermediate_key = parse_key_for(
            &store.label(names.intermediate_key),
            &read(names.intermediate_key, true)?,
            &intermediate_label,
            &intermediate,
        )?;
        Ok(KeySet {
            root,
            root_key,
            intermediate,
            intermediate_key,
        })
    }

    /// Writes the set under `names`: keys first, then certificates. A set without its root's
    /// key leaves no root key under `names` (an older one there is removed).
    pub fn save(
        &self,
        store: &mut (impl KeyStore + ?Sized),
        names: &Names,
    ) -> Result<(), KeyError> {
        match &self.root_key {
            Some(key) => {
                store.write(names.root_key, &key.serialize_pem(), true)?;
                store.remove(names.root_key_offline)?;
            }
            None => {
                store.write(
                    names.root_key_offline,
                    "The root's key is kept offline by its operator: new intermediates come from `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`.\n",
                    false,
                )?;
                store.remove(names.root_key)?;
            }
        }
        store.write(
            names.intermediate_key,
            &self.intermediate_key.serialize_pem(),
            true,
        )?;
        store.write(names.root_cert, &cert_to_pem(&self.root), false)?;
        store.write(
            names.intermediate_cert,
            &cert_to_pem(&self.intermediate),
            false,
        )
    }

    /// What the authority signs with, when this set issues.
    pub fn material(&self) -> Result<KeyMaterial, KeyError> {
        material(
            self.root.clone(),
            self.intermediate.clone(),
            copy_key(&self.intermediate_key)?,
            std::path::Path::new("intermediate"),
        )
    }

    /// Whether the CA holds the root's key, and so can make intermediates under it itself.
    pub fn root_key_held(&self) -> bool {
        self.root_key.is_some()
    }

    pub fn root_fingerprint(&self) -> String {
        sha256_fingerprint(&self.root)
    }

    pub fn intermediate_fingerprint(&self) -> String {
        sha256_fingerprint(&self.intermediate)
    }

    /// Whether `leaf` was signed by this set's intermediate.
    pub fn issued(&self, leaf: &CertificateDer<'_>) -> bool {
        issued_by(leaf, &self.intermediate)
    }
}

pub(super) fn copy_key(key: &KeyPair) -> Result<KeyPair, KeyError> {
    KeyPair::try_from(key.serialize_der()).map_err(|e| KeyError::Generate(e.to_string()))
}

/// The least life an operator's root must have left to be rotated to.
pub const MIN_OPERATOR_ROOT_LIFE: time::Duration = time::Duration::days(30);

/// The longest operator file read.
const MAX_OPERATOR_FILE: u64 = 64 * 1024;

/// An operator's PEM file: a regular file of at most [`MAX_OPERATOR_FILE`] bytes.
pub(super) fn read_operator_file(path: &std::path::Path) -> Result<String, KeyError> {
    use std::io::Read;
    let unusable = |why: &str| KeyError::Parse(path.into(), why.into());
    let meta = std::fs::metadata(path).map_err(|e| KeyError::Read(path.into(), e))?;
    if !meta.is_file() {
        return Err(unusable("not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_OPERATOR_FILE + 1).read_to_string(&mut text))
        .map_err(|e| KeyError::Read(path.into(), e))?;
    if text.len() as u64 > MAX_OPERATOR_FILE {
        return Err(unusable("over 64 KiB: not a PEM certificate or key"));
    }
    Ok(text)
}

/// Removes every entry of a set; its private keys are gone with them.
pub fn remove(store: &mut (impl KeyStore + ?Sized), names: &Names) -> Result<(), KeyError> {
    for name in [
        names.root_key,
        names.intermediate_key,
        names.root_cert,
        names.intermediate_cert,
        names.root_key_offline,
    ] {
        store.remove(name)?;
    }
    Ok(())
}

/// Whether any entry of a set is present.
pub fn any_present(store: &(impl KeyStore + ?Sized), names: &Names) -> Result<bool, KeyError> {
    for name in [
        names.root_cert,
        names.root_key,
        names.intermediate_cert,
        names.intermediate_key,
        names.root_key_offline,
    ] {
        if store.read(name, false)?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn read_record(store: &(impl KeyStore + ?Sized)) -> Result<Option<Record>, KeyError> {
    let Some(text) = store.read(ROTATION_FILE, false)? else {
        return Ok(None);
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        KeyError::Parse(
            store.label(ROTATION_FILE),
            format!(
                "{e}: restore it from a backup, or remove it and the next-* entries to abandon the rotation (the current root and intermediate stay)"
            ),
        )
    })
}

pub fn write_record(
    store: &mut (impl KeyStore + ?Sized),
    record: Option<&Record>,
) -> Result<(), KeyError> {
    match record {
        Some(r) => {
            let text = serde_json::to_string_pretty(r).expect("records serialize");
            store.write(ROTATION_FILE, &text, false)
        }
        None => store.remove(ROTATION_FILE),
    }
}

/// The end of a rotation: the next set becomes the current one (the old keys are overwritten),
/// then the record goes, then the `next-*` entries. Redone from the start when a restart finds
/// the record still in `retiring`.
pub fn promote(
    store: &mut (impl KeyStore + ?Sized),
    now: OffsetDateTime,
) -> Result<KeySet, KeyError> {
    let next = KeySet::load(store, &NEXT, now)?;
    next.save(store, &CURRENT)?;
    write_record(store, None)?;
    remove(store, &NEXT)?;
    store.remove(PROXIES_FILE)?;
    Ok(next)
}
