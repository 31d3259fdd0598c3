//! TLS credentials: one loader that turns a chain and its private key into a rustls
//! `CertifiedKey` and checks that the key belongs to the leaf, and the one server resolver that
//! hands every handshake the current credentials and lets them be swapped in place (the CA's
//! serving certificate renews itself; the injector's is reloaded from its files). The
//! `ServerConfig` around it is built once.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use palisade_ca_api::tls::crypto_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no certificate in the chain: give the leaf certificate first")]
    NoCertificate,
    #[error("not a PEM certificate chain: {0}")]
    BadCertificate(String),
    #[error("not a usable private key ({0}): give a PKCS#8, SEC1 or PKCS#1 key")]
    BadKey(String),
    #[error(
        "the private key does not belong to the leaf certificate ({0}): give the matching pair"
    )]
    Mismatch(String),
}

/// A chain (leaf first) and its key, checked to match.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, CredentialError> {
    if chain.is_empty() {
        return Err(CredentialError::NoCertificate);
    }
    CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CredentialError::Mismatch(e.to_string()),
        other => CredentialError::BadKey(other.to_string()),
    })
}

/// [`certified_key`] from PEM text.
pub fn certified_key_from_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CredentialError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialError::BadCertificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(CredentialError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| CredentialError::BadKey(e.to_string()))?;
    certified_key(chain, key)
}

/// Hands every handshake the current credentials; [`ReloadingResolver::swap`] replaces them
/// for the next handshake without touching connections already made.
pub struct ReloadingResolver {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for ReloadingResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No key material in logs.
        f.debug_struct("ReloadingResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(key),
        }
    }

    pub fn swap(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// DER of the leaf handed out now.
    pub fn current_leaf(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_pair_loads_and_a_foreign_key_is_refused() {
        let (cert, key) = pair();
        let (_, other_key) = pair();
        assert!(certified_key_from_pem(cert.as_bytes(), key.as_bytes()).is_ok());
        let err = certified_key_from_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(matches!(err, CredentialError::Mismatch(_)), "{err}");
        assert_eq!(
            certified_key_from_pem(b"", key.as_bytes()).unwrap_err(),
            CredentialError::NoCertificate
        );
        assert!(matches!(
            certified_key_from_pem(cert.as_bytes(), b"not a key").unwrap_err(),
            CredentialError::BadKey(_)
        ));
    }

    #[test]
    fn the_resolver_hands_out_what_was_swapped_in() {
        let load =
            |(c, k): (String, String)| certified_key_from_pem(c.as_bytes(), k.as_bytes()).unwrap();
        let first = load(pair());
        let second = load(pair());
        let second_leaf = second.cert[0].to_vec();
        let resolver = ReloadingResolver::new(first);
        assert_ne!(resolver.current_leaf(), second_leaf);
        resolver.swap(second);
        assert_eq!(resolver.current_leaf(), second_leaf);
        assert!(!format!("{resolver:?}").contains("key"));
    }
}
