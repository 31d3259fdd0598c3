//! The CA's key material: a generated root and intermediate kept in the state directory, or a
//! root or intermediate brought by the operator. Everything is validated at start-up, and every
//! refusal names the file at fault.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use palisade_ca_api::cert::{cert_to_pem, parse_pem_certs};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

pub const ROOT_CERT_FILE: &str = "root.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const INTERMEDIATE_CERT_FILE: &str = "intermediate.pem";
pub const INTERMEDIATE_KEY_FILE: &str = "intermediate-key.pem";

/// How long the CA's own certificates live. An intermediate is capped at its root's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub root: Duration,
    pub intermediate: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            root: Duration::days(3650),
            intermediate: Duration::days(365),
        }
    }
}

impl Lifetimes {
    /// A stored intermediate closer than this to expiry is replaced at start-up (a fallback:
    /// with automatic rotation it is replaced at half its life).
    fn intermediate_renew_before(&self) -> Duration {
        std::cmp::min(self.intermediate / 4, Duration::days(30))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot write {0}: {1} (is --state-dir writable?)")]
    Write(PathBuf, std::io::Error),
    #[error("{0} is not usable: {1}")]
    Parse(PathBuf, String),
    #[error(
        "the key in {key} does not belong to the certificate in {cert}: give the matching pair"
    )]
    Mismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "{0} is not a CA certificate (basicConstraints cA=true is required to issue certificates)"
    )]
    NotCa(PathBuf),
    #[error("{0} expired at {1}: renew it, or let the CA generate its own by removing the flag")]
    Expired(PathBuf, OffsetDateTime),
    #[error(
        "the mesh's root {0} expired at {1}, so every certificate under it is refused: recover with `palisade-ca rotate root --emergency --state-dir <dir>` and publish the new bundle (docs/rotation.md, \"Emergency\")"
    )]
    RootExpired(PathBuf, OffsetDateTime),
    #[error("{0} is not valid yet (notBefore {1}): check the clock")]
    NotYetValid(PathBuf, OffsetDateTime),
    #[error("the chain in {0} does not link: {1}")]
    Chain(PathBuf, String),
    #[error(
        "{file} holds a root but {missing} is missing: restore it, or move the state directory away to start a new root"
    )]
    Incomplete { file: PathBuf, missing: PathBuf },
    #[error("cannot create keys: {0}")]
    Generate(String),
    /// Another CA replica drives the rotation (Kubernetes mode): this one changes nothing.
    #[error("{0}")]
    NotDriver(String),
    #[error(
        "this CA does not hold its root's key (an operator's root, kept offline), so it cannot make an intermediate under it: sign one with that root and run `palisade-ca rotate intermediate --from-cert F --from-key F --chain F` (docs/rotation.md, \"An intermediate from an offline root\")"
    )]
    RootKeyOffline,
    #[error(
        "{missing} is missing while {record} records a rotation under way: restore it, or remove {record} and the next-* files to abandon the rotation (the current root and intermediate stay in use)"
    )]
    RotationIncomplete { record: PathBuf, missing: PathBuf },
}

/// Where the signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeySource {
    /// A root made on first start and kept in the state directory.
    #[default]
    Generated,
    /// An operator's root (cert and key); the CA makes its intermediate from it.
    ExternalRoot { cert: PathBuf, key: PathBuf },
    /// An operator's intermediate with its chain up to the root; the root key stays offline.
    ExternalIntermediate {
        cert: PathBuf,
        key: PathBuf,
        chain: PathBuf,
    },
}

/// What the CA signs with and what it publishes as trust anchors.
pub struct KeyMaterial {
    /// Every root the mesh trusts; the first is the one that issued the intermediate.
    pub roots: Vec<CertificateDer<'static>>,
    /// Certificates between the leaf and the root, issuing intermediate first.
    pub intermediates: Vec<CertificateDer<'static>>,
    pub intermediate_key: KeyPair,
    pub intermediate_not_after: OffsetDateTime,
    pub root_not_after: OffsetDateTime,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("roots", &self.roots.len())
            .field("intermediates", &self.intermediates.len())
            .field("intermediate_key", &"<redacted>")
            .finish()
    }
}

impl KeyMaterial {
    /// The rcgen issuer for the intermediate.
    pub fn issuer(&self) -> Result<Issuer<'static, KeyPair>, KeyError> {
        let key = KeyPair::try_from(self.intermediate_key.serialize_der())
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Issuer::from_ca_cert_der(&self.intermediates[0], key)
            .map_err(|e| KeyError::Generate(e.to_string()))
    }
}

/// Where a generated root and intermediate are kept between starts: the files of the state
/// directory, or (Kubernetes mode) a map of PEM texts that the caller stores in a Secret, so
/// that nothing private touches the filesystem there.
pub trait KeyStore {
    /// What a message calls the entry `name`: its path, or `key NAME`.
    fn label(&self, name: &str) -> PathBuf;
    fn read(&self, name: &str, private: bool) -> Result<Option<String>, KeyError>;
    fn write(&mut self, name: &str, text: &str, private: bool) -> Result<(), KeyError>;
    /// Removes the entry; absent is fine.
    fn remove(&mut self, name: &str) -> Result<(), KeyError>;
}

/// The state directory: keys 0600, written atomically.
pub struct DirStore(pub PathBuf);

impl KeyStore for DirStore {
    fn label(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn read(&self, name: &str, private: bool) -> Result<Option<String>, KeyError> {
        let path = self.0.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(|e| KeyError::Read(path.clone(), e))?;
        if private {
            tighten_permissions(&path);
        }
        Ok(Some(text))
    }

    fn write(&mut self, name: &str, text: &str, private: bool) -> Result<(), KeyError> {
        let mode = if private { 0o600 } else { 0o644 };
        write_atomic(&self.0.join(name), text.as_bytes(), mode)
    }

    fn remove(&mut self, name: &str) -> Result<(), KeyError> {
        let path = self.0.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(KeyError::Write(path, e)),
            Err(_) => Ok(()),
            Ok(()) => sync_parent(&path).map_err(|e| KeyError::Write(path, e)),
        }
    }
}

/// PEM texts by entry name, held in memory only (the Secret's `data`).
pub type MemoryStore = BTreeMap<String, String>;

impl KeyStore for MemoryStore {
    fn label(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("key {name}"))
    }

    fn read(&self, name: &str, _private: bool) -> Result<Option<String>, KeyError> {
        Ok(self.get(name).cloned())
    }

    fn write(&mut self, name: &str, text: &str, _private: bool) -> Result<(), KeyError> {
        self.insert(name.to_owned(), text.to_owned());
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), KeyError> {
        BTreeMap::remove(self, name);
        Ok(())
    }
}

/// Loads the key material, creating what is missing in the state directory (mode 0600 for keys).
pub fn load_or_create(
    state_dir: &Path,
    source: &KeySource,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<KeyMaterial, KeyError> {
    fs::create_dir_all(state_dir).map_err(|e| KeyError::Write(state_dir.into(), e))?;
    load_or_create_in(
        &mut DirStore(state_dir.into()),
        source,
        trust_domain,
        &Lifetimes::default(),
        now,
    )
}

/// Loads the key material, keeping what the CA makes itself (a generated root, an intermediate
/// under an operator's root) in `store`.
pub fn load_or_create_in(
    store: &mut (impl KeyStore + ?Sized),
    source: &KeySource,
    trust_domain: &str,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<KeyMaterial, KeyError> {
    match source {
        KeySource::ExternalIntermediate { cert, key, chain } => {
            load_external_intermediate(cert, key, chain, now)
        }
        KeySource::ExternalRoot { cert, key } => {
            let root = load_ca_cert(cert, now)?;
            let root_key = load_key_for(key, cert, &root)?;
            ensure_intermediate(store, root, &root_key, trust_domain, lifetimes, now)
        }
        KeySource::Generated => load_or_create_generated(store, trust_domain, lifetimes, now),
    }
}

/// The generated root and intermediate from `store`, made there when absent; an intermediate
/// near expiry (or from another root) is replaced.
pub fn load_or_create_generated(
    store: &mut (impl KeyStore + ?Sized),
    trust_domain: &str,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<KeyMaterial, KeyError> {
    let (cert, key) = (store.label(ROOT_CERT_FILE), store.label(ROOT_KEY_FILE));
    let stored = (
        store.read(ROOT_CERT_FILE, false)?,
        store.read(ROOT_KEY_FILE, true)?,
    );
    let (root, root_key) = match stored {
        (Some(cert_pem), Some(key_pem)) => {
            let root = parse_ca_cert(&cert, &cert_pem, now).map_err(|e| match e {
                KeyError::Expired(path, at) => KeyError::RootExpired(path, at),
                e => e,
            })?;
            let root_key = parse_key_for(&key, &key_pem, &cert, &root)?;
            (root, root_key)
        }
        (None, None) => {
            let (root, root_key) = generate_root(trust_domain, lifetimes.root, now)?;
            store.write(ROOT_KEY_FILE, &root_key.serialize_pem(), true)?;
            store.write(ROOT_CERT_FILE, &cert_to_pem(&root), false)?;
            tracing::info!(path = %cert.display(), "created a new root CA");
            (root, root_key)
        }
        (Some(_), None) => {
            return Err(KeyError::Incomplete {
                file: cert,
                missing: key,
            });
        }
        (None, Some(_)) => {
            return Err(KeyError::Incomplete {
                file: key,
                missing: cert,
            });
        }
    };
    ensure_intermediate(store, root, &root_key, trust_domain, lifetimes, now)
}

fn ensure_intermediate(
    store: &mut (impl KeyStore + ?Sized),
    root: CertificateDer<'static>,
    root_key: &KeyPair,
    trust_domain: &str,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<KeyMaterial, KeyError> {
    let (cert, key) = (
        store.label(INTERMEDIATE_CERT_FILE),
        store.label(INTERMEDIATE_KEY_FILE),
    );
    let stored = (
        store.read(INTERMEDIATE_CERT_FILE, false)?,
        store.read(INTERMEDIATE_KEY_FILE, true)?,
    );
    if let (Some(cert_pem), Some(key_pem)) = stored {
        let stored = parse_certs(&cert, &cert_pem)?.remove(0);
        let usable = issued_by(&stored, &root)
            && not_after(&stored).is_ok_and(|t| t - lifetimes.intermediate_renew_before() > now);
        if usable {
            let ikey = parse_key_for(&key, &key_pem, &cert, &stored)?;
            return material(root, stored, ikey, &cert);
        }
        tracing::info!(path = %cert.display(), "stored intermediate is near expiry or from another root; issuing a new one");
    }
    let (intermediate, ikey) =
        generate_intermediate(&root, root_key, trust_domain, lifetimes.intermediate, now)?;
    store.write(INTERMEDIATE_KEY_FILE, &ikey.serialize_pem(), true)?;
    store.write(INTERMEDIATE_CERT_FILE, &cert_to_pem(&intermediate), false)?;
    material(root, intermediate, ikey, &cert)
}

/// What a root and the intermediate it issued sign with; `label` names the intermediate.
pub(crate) fn material(
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    intermediate_key: KeyPair,
    label: &Path,
) -> Result<KeyMaterial, KeyError> {
    let intermediate_not_after =
        not_after(&intermediate).map_err(|e| KeyError::Parse(label.into(), e))?;
    let root_not_after = not_after(&root).map_err(|e| KeyError::Parse(label.into(), e))?;
    Ok(KeyMaterial {
        roots: vec![root],
        intermediates: vec![intermediate],
        intermediate_key,
        intermediate_not_after,
        root_not_after,
    })
}

fn load_external_intermediate(
    cert: &Path,
    key: &Path,
    chain: &Path,
    now: OffsetDateTime,
) -> Result<KeyMaterial, KeyError> {
    let intermediate = load_ca_cert(cert, now)?;
    let ikey = load_key_for(key, cert, &intermediate)?;
    let chain_certs = read_certs(chain)?;
    let mut path = vec![intermediate.clone()];
    for (i, c) in chain_certs.iter().enumerate() {
        check_ca(chain, c, now)?;
        let child = path.last().expect("path starts non-empty");
        if !issued_by(child, c) {
            return Err(KeyError::Chain(
                chain.into(),
                format!(
                    "certificate #{i} of the chain did not issue the one before it (order: intermediate's issuer first, root last)"
                ),
            ));
        }
        path.push(c.clone());
    }
    let root = path.last().expect("non-empty").clone();
    if !issued_by(&root, &root) {
        return Err(KeyError::Chain(
            chain.into(),
            "the chain must end with the self-signed root".into(),
        ));
    }
    let intermediate_not_after =
        not_after(&intermediate).map_err(|e| KeyError::Parse(cert.into(), e))?;
    let intermediates = path[..path.len() - 1].to_vec();
    let root_not_after = not_after(&root).map_err(|e| KeyError::Parse(chain.into(), e))?;
    Ok(KeyMaterial {
        roots: vec![root],
        intermediates,
        intermediate_key: ikey,
        intermediate_not_after,
        root_not_after,
    })
}

fn ca_name(trust_domain: &str, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("Palisade {trust_domain}"));
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ca_params(
    dn: DistinguishedName,
    path_len: u8,
    now: OffsetDateTime,
    lifetime: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + lifetime;
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

pub(crate) fn generate_root(
    trust_domain: &str,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<(CertificateDer<'static>, KeyPair), KeyError> {
    let key = KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
    let mut params = ca_params(ca_name(trust_domain, "Palisade Root CA"), 1, now, lifetime);
    params.use_authority_key_identifier_extension = false;
    let cert = params
        .self_signed(&key)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok((cert.der().clone(), key))
}

/// An intermediate under `root`, living `lifetime` but never past the root.
pub(crate) fn generate_intermediate(
    root: &CertificateDer<'static>,
    root_key: &KeyPair,
    trust_domain: &str,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<(CertificateDer<'static>, KeyPair), KeyError> {
    let key = KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
    let mut params = ca_params(
        ca_name(trust_domain, "Palisade Intermediate CA"),
        0,
        now,
        lifetime,
    );
    if let Ok(root_not_after) = not_after(root) {
        params.not_after = params.not_after.min(root_not_after);
    }
    let issuer =
        Issuer::from_ca_cert_der(root, root_key).map_err(|e| KeyError::Generate(e.to_string()))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok((cert.der().clone(), key))
}

/// A random, positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG works");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40; // keep 16 significant bytes
    SerialNumber::from_slice(&bytes)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let text = fs::read_to_string(path).map_err(|e| KeyError::Read(path.into(), e))?;
    parse_certs(path, &text)
}

pub(crate) fn parse_certs(
    label: &Path,
    text: &str,
) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    parse_pem_certs(text).map_err(|e| KeyError::Parse(label.into(), e.to_string()))
}

pub(crate) fn load_ca_cert(
    path: &Path,
    now: OffsetDateTime,
) -> Result<CertificateDer<'static>, KeyError> {
    let cert = read_certs(path)?.remove(0);
    check_ca(path, &cert, now)?;
    Ok(cert)
}

pub(crate) fn parse_ca_cert(
    label: &Path,
    text: &str,
    now: OffsetDateTime,
) -> Result<CertificateDer<'static>, KeyError> {
    let cert = parse_certs(label, text)?.remove(0);
    check_ca(label, &cert, now)?;
    Ok(cert)
}

fn check_ca(path: &Path, der: &CertificateDer<'_>, now: OffsetDateTime) -> Result<(), KeyError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| KeyError::Parse(path.into(), e.to_string()))?;
    if !cert.is_ca() {
        return Err(KeyError::NotCa(path.into()));
    }
    let validity = cert.validity();
    if validity.not_after.to_datetime() <= now {
        return Err(KeyError::Expired(
            path.into(),
            validity.not_after.to_datetime(),
        ));
    }
    if validity.not_before.to_datetime() > now {
        return Err(KeyError::NotYetValid(
            path.into(),
            validity.not_before.to_datetime(),
        ));
    }
    Ok(())
}

pub(crate) fn not_after(der: &CertificateDer<'_>) -> Result<OffsetDateTime, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Whether `child`'s signature verifies with `parent`'s key and names it as issuer.
pub(crate) fn issued_by(child: &CertificateDer<'_>, parent: &CertificateDer<'_>) -> bool {
    let (Ok((_, c)), Ok((_, p))) = (
        X509Certificate::from_der(child),
        X509Certificate::from_der(parent),
    ) else {
        return false;
    };
    c.issuer() == p.subject() && c.verify_signature(Some(p.public_key())).is_ok()
}

pub(crate) fn load_key_for(
    key_path: &Path,
    cert_path: &Path,
    cert: &CertificateDer<'_>,
) -> Result<KeyPair, KeyError> {
    let text = fs::read_to_string(key_path).map_err(|e| KeyError::Read(key_path.into(), e))?;
    tighten_permissions(key_path);
    parse_key_for(key_path, &text, cert_path, cert)
}

/// Parses a PKCS#8 PEM key and checks that it is the key of `cert`.
pub(crate) fn parse_key_for(
    key_label: &Path,
    text: &str,
    cert_label: &Path,
    cert: &CertificateDer<'_>,
) -> Result<KeyPair, KeyError> {
    let key = KeyPair::from_pem(text).map_err(|e| {
        KeyError::Parse(
            key_label.into(),
            format!("not a PKCS#8 PEM private key of a supported type: {e}"),
        )
    })?;
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| KeyError::Parse(cert_label.into(), e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(KeyError::Mismatch {
            key: key_label.into(),
            cert: cert_label.into(),
        });
    }
    Ok(key)
}

fn tighten_permissions(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "private key readable by others; setting mode 0600");
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
        }
    }
}

/// Writes a private key: created with mode 0600, written in full, then renamed into place.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    write_atomic(path, contents, 0o600)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    let err = |e| KeyError::Write(path.into(), e);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    sync_parent(path).map_err(err)
}

/// Makes a rename or removal in `path`'s directory durable, so that what is written after it
/// (a rotation's record after its keys) never lands first.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
