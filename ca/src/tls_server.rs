//! Client authentication on the CA's port: optional at the TLS layer, so certificate requests
//! (authenticated by token) need no certificate; the mesh watch then verifies the chain with
//! rustls's WebPKI verifier and answers a clear JSON error instead of a bare TLS alert.

use palisade_ca_api::tls::handshake_signature;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

#[derive(Debug)]
pub struct OptionalClientAuth {
    subjects: Vec<DistinguishedName>,
}

impl OptionalClientAuth {
    pub fn new(roots: &RootCertStore) -> Self {
        OptionalClientAuth {
            subjects: roots.subjects(),
        }
    }
}

impl ClientCertVerifier for OptionalClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    /// Deferred: the handshake still proves the client holds the leaf's key (the signature
    /// checks below); the chain is verified by the handler that needs an identity.
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature::verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature::verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        handshake_signature::supported_schemes()
    }
}
