//! The one crypto choke point, and chain verification built on rustls's WebPKI verifiers.

use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::cert::{CertError, spiffe_id_from_cert};
use crate::spiffe::SpiffeId;

/// The ALPN protocol of mesh connections between proxies.
pub const MESH_ALPN: &[u8] = b"palisade/1";

/// The ALPN protocol of pooled tunnels between proxies: HTTP/2 over the mTLS connection, one
/// CONNECT stream per app connection (docs/proxy.md, "Pooled tunnels"). Offered before
/// [`MESH_ALPN`], which stays for proxies that do not speak it.
pub const MESH_TUNNEL_ALPN: &[u8] = b"palisade-tunnel/1";

/// The rustls crypto provider every Palisade component uses. Nothing else names a provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs [`crypto_provider`] as the process default (for libraries that ask for it).
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default((*crypto_provider()).clone());
}

/// The handshake-signature checks every Palisade certificate verifier shares (the mesh's
/// client and server verifiers, the CA's optional client authentication, the proxy's HTTPS
/// probes): the algorithms are [`crypto_provider`]'s, so no verifier names its own.
pub mod handshake_signature {
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::HandshakeSignatureValid;
    use rustls::{Error, SignatureScheme};
    use rustls_pki_types::CertificateDer;

    use super::crypto_provider;

    pub fn verify_tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = crypto_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms)
    }

    pub fn verify_tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algorithms = crypto_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
    }

    /// For mesh connections, which are TLS 1.3 only.
    pub fn refuse_tls12() -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    pub fn supported_schemes() -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A root store holding every root of a trust bundle.
pub fn root_store(bundle: &[CertificateDer<'static>]) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for root in bundle {
        roots
            .add(root.clone())
            .map_err(|e| CertError::Untrusted(format!("trust bundle root is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(CertError::Untrusted(
            "the trust bundle holds no root".into(),
        ));
    }
    Ok(roots)
}

/// Verifies a workload chain (leaf first) against `roots` for client and server use, with
/// rustls's WebPKI verifier, and returns the leaf's SPIFFE ID.
pub fn verify_workload_chain(
    roots: Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<SpiffeId, CertError> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| CertError::Untrusted("the chain is empty".into()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| CertError::Untrusted(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| CertError::Untrusted(e.to_string()))?;
    spiffe_id_from_cert(leaf)
}
