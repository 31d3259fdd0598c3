//! TLS configs, built once. The server side requires a client certificate chaining to the
//! trust bundle and carrying a SPIFFE ID; the client side checks the server's chain and then
//! that it carries exactly the SPIFFE ID expected for the destination. Both wrap rustls's
//! WebPKI verifiers; the bundle they read is swapped atomically, so a new root is trusted from
//! the next handshake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::{CertError, parse_pem_certs, sha256_fingerprint, spiffe_id_from_cert};
use palisade_ca_api::tls::{
    MESH_ALPN, MESH_TUNNEL_ALPN, crypto_provider, handshake_signature, root_store,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::identity::CertStore;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("cannot build a TLS config: {0}")]
    Config(String),
}

struct BundleState {
    ders: Arc<Vec<CertificateDer<'static>>>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// The roots the mesh trusts, swappable as a whole.
pub struct TrustBundle {
    state: ArcSwap<BundleState>,
    /// Counts changes, so that the mesh watch can tell the CA its new roots at once.
    changes: watch::Sender<u64>,
    /// Serialises replacements, so that a check of the generation and the swap are one step.
    writer: std::sync::Mutex<()>,
}

/// What a bundle offered by the CA (in a certificate answer or on the mesh watch) does to the
/// current one.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Nothing offered, or the roots trusted now.
    Keep,
    /// It keeps a root trusted now: adopt it.
    Adopt(Vec<CertificateDer<'static>>),
    /// It shares no root with the current bundle: refused.
    Refuse,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({} roots)", self.state.load().ders.len())
    }
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        Ok(TrustBundle {
            state: ArcSwap::from_pointee(Self::build(roots)?),
            changes: watch::Sender::new(0),
            writer: std::sync::Mutex::new(()),
        })
    }

    fn build(ders: Vec<CertificateDer<'static>>) -> Result<BundleState, TlsError> {
        let roots = Arc::new(root_store(&ders).map_err(|e| TlsError::Bundle(e.to_string()))?);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), crypto_provider())
                .build()
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        Ok(BundleState {
            ders: Arc::new(ders),
            roots,
            client_verifier,
        })
    }

    /// Replaces every root at once; the next handshake uses the new set.
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.replace_locked(roots)
    }

    /// Replaces the roots only if they are still those of `generation`: an offer that came
    /// over a connection verified against older roots (the anchors file changed meanwhile) is
    /// never judged against the new ones. False when the bundle had moved on.
    pub fn replace_at(
        &self,
        generation: u64,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<bool, TlsError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation() != generation {
            return Ok(false);
        }
        self.replace_locked(roots).map(|()| true)
    }

    fn replace_locked(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        if *self.state.load().ders == roots {
            return Ok(());
        }
        self.state.store(Arc::new(Self::build(roots)?));
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Grows with every change of the roots.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Changes with every replacement that changed the roots.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn ders(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.state.load().ders.clone()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.state.load().roots.clone()
    }

    /// Whether `offered` keeps at least one root of the current bundle.
    pub fn continues_with(&self, offered: &[CertificateDer<'static>]) -> bool {
        let current = self.ders();
        offered.iter().any(|r| current.contains(r))
    }

    /// The one rule for a bundle the CA offers: it is adopted when it keeps at least one root
    /// trusted now, so that a root rotation goes through but an unrelated root never gets in.
    /// (The anchors file is another matter: it is a trusted channel, adopted as it is.)
    pub fn judge_offer(&self, offered: Vec<CertificateDer<'static>>) -> Offer {
        if offered.is_empty() || same_roots(&self.ders(), &offered) {
            Offer::Keep
        } else if self.continues_with(&offered) {
            Offer::Adopt(offered)
        } else {
            Offer::Refuse
        }
    }

    /// The SHA-256 fingerprints of the roots, sorted and without duplicates: what the mesh
    /// watch says the proxy trusts (`root=`).
    pub fn fingerprints(&self) -> Vec<String> {
        let mut fps: Vec<String> = self.ders().iter().map(|d| sha256_fingerprint(d)).collect();
        fps.sort();
        fps.dedup();
        fps
    }
}

/// Whether two bundles hold the same roots, in whatever order.
fn same_roots(a: &[CertificateDer<'static>], b: &[CertificateDer<'static>]) -> bool {
    fn sorted<'a>(roots: &'a [CertificateDer<'static>]) -> Vec<&'a [u8]> {
        let mut v: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
        v.sort();
        v.dedup();
        v
    }
    sorted(a) == sorted(b)
}

/// Every certificate of a list of PEM texts (a trust bundle as the CA sends it).
pub fn parse_pem_list(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut certs = Vec::new();
    for pem in pems {
        certs.extend(parse_pem_certs(pem)?);
    }
    Ok(certs)
}

/// Server side: a client certificate is required, must chain to the bundle and carry a
/// SPIFFE ID.
#[derive(Debug)]
struct MeshClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the bundle is swappable so none is borrowed from it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .bundle
            .state
            .load()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_from_cert(end_entity).map_err(|_| {
            Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        handshake_signature::refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        handshake_signature::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        handshake_signature::supported_schemes()
    }
}

/// Client side: the server's chain must link to the bundle (with serverAuth), and its SPIFFE
/// ID must be exactly `expected`. This replaces the DNS name check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let state = self.bundle.state.load();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &state.roots,
            intermediates,
            now,
            crypto_provider().signature_verification_algorithms.all,
        )?;
        match spiffe_id_from_cert(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(expected = %self.expected, presented = %id,
                    "the destination presented another identity than the control plane announced; refusing");
                Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(e) => {
                tracing::warn!(expected = %self.expected, error = %e, "the destination's certificate carries no usable SPIFFE ID");
                Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        handshake_signature::refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        handshake_signature::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        handshake_signature::supported_schemes()
    }
}

/// The inbound server config: TLS 1.3, ALPN `palisade-tunnel/1` (preferred, when `tunnels`)
/// and `palisade/1`, client certificate required. No resumption: every connection proves its
/// identity against the current bundle.
pub fn server_config(
    store: Arc<CertStore>,
    bundle: Arc<TrustBundle>,
    tunnels: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier { bundle }))
        .with_cert_resolver(store);
    config.alpn_protocols = alpn(tunnels);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The ALPN list both sides offer: the tunnel first when tunnels are on; `palisade/1` always,
/// so that a proxy without tunnels (older, or `PALISADE_TUNNELS=off`) still meets this one.
fn alpn(tunnels: bool) -> Vec<Vec<u8>> {
    let mut list = Vec::with_capacity(2);
    if tunnels {
        list.push(MESH_TUNNEL_ALPN.to_vec());
    }
    list.push(MESH_ALPN.to_vec());
    list
}

/// Most distinct destination identities whose client config is kept; past it the cache is
/// emptied and refilled (a config is cheap to build, but never built per connection).
const MAX_CLIENT_CONFIGS: usize = 512;

/// Outbound client configs, one per expected server identity, each built once.
pub struct ClientConfigs {
    tunnels: bool,
    store: Arc<CertStore>,
    bundle: Arc<TrustBundle>,
    by_identity: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl ClientConfigs {
    pub fn new(store: Arc<CertStore>, bundle: Arc<TrustBundle>, tunnels: bool) -> Self {
        ClientConfigs {
            tunnels,
            store,
            bundle,
            by_identity: Mutex::new(HashMap::new()),
        }
    }

    /// The config that accepts only a server presenting `expected`.
    pub fn for_identity(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let mut map = self.by_identity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(expected) {
            return Ok(c.clone());
        }
        if map.len() >= MAX_CLIENT_CONFIGS {
            map.clear();
        }
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                bundle: self.bundle.clone(),
                expected: expected.clone(),
            }))
            .with_client_cert_resolver(self.store.clone());
        config.alpn_protocols = alpn(self.tunnels);
        // No resumption: a resumed session would skip the identity check above.
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        map.insert(expected.clone(), config.clone());
        Ok(config)
    }
}

/// A short, bounded label for a failed handshake (metrics and logs).
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    if err.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => "expired",
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "wrong_identity"
        }
        Error::InvalidCertificate(_) => "invalid_certificate",
        Error::AlertReceived(_) => "peer_alert",
        Error::NoApplicationProtocol => "no_alpn",
        Error::PeerIncompatible(_) => "incompatible",
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => "bad_message",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use palisade_testkit::pki::Authority;

    use super::*;

    #[test]
    fn an_offer_is_adopted_only_when_it_keeps_a_current_root() {
        let (old, new, other) = (
            Authority::new("old"),
            Authority::new("new"),
            Authority::new("other"),
        );
        let bundle = TrustBundle::new(vec![old.root_der()]).unwrap();
        assert_eq!(bundle.judge_offer(vec![]), Offer::Keep);
        assert_eq!(bundle.judge_offer(vec![old.root_der()]), Offer::Keep);
        let bundle = TrustBundle::new(vec![old.root_der(), new.root_der()]).unwrap();
        assert_eq!(
            bundle.judge_offer(vec![new.root_der(), old.root_der()]),
            Offer::Keep,
            "the same roots in another order change nothing"
        );
        let bundle = TrustBundle::new(vec![old.root_der()]).unwrap();
        let both = vec![old.root_der(), new.root_der()];
        assert_eq!(bundle.judge_offer(both.clone()), Offer::Adopt(both));
        assert_eq!(bundle.judge_offer(vec![new.root_der()]), Offer::Refuse);
        assert_eq!(
            bundle.judge_offer(vec![other.root_der(), new.root_der()]),
            Offer::Refuse
        );
    }

    #[test]
    fn fingerprints_are_sorted_and_a_replacement_is_signalled_once() {
        let (a, b) = (Authority::new("a"), Authority::new("b"));
        let bundle = TrustBundle::new(vec![a.root_der()]).unwrap();
        let changes = bundle.changes();
        bundle.replace(vec![a.root_der()]).unwrap();
        assert!(
            !changes.has_changed().unwrap(),
            "the same roots are no change"
        );
        bundle
            .replace(vec![b.root_der(), a.root_der(), b.root_der()])
            .unwrap();
        assert!(changes.has_changed().unwrap());
        let mut want = vec![
            sha256_fingerprint(&a.root_der()),
            sha256_fingerprint(&b.root_der()),
        ];
        want.sort();
        assert_eq!(bundle.fingerprints(), want);
    }
}
