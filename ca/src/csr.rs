//! Checks on a certificate signing request before anything is signed. Pure: DER in, verdict out.

use palisade_ca_api::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Why a CSR is refused; each maps to one API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not PEM: send one '-----BEGIN CERTIFICATE REQUEST-----' block")]
    NotPem,
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error(
        "the CSR's signature does not verify: a CSR must be signed by the private key of the public key it carries"
    )]
    BadSignature,
    #[error(
        "the CSR's key is {0}: use ECDSA P-256 (recommended), P-384, Ed25519 or RSA of at least 2048 bits"
    )]
    UnsupportedKey(String),
    #[error(
        "the CSR asks for {0}: a CSR may carry at most one URI SAN, the caller's own SPIFFE ID, and no other extension"
    )]
    ForbiddenContent(String),
    #[error(
        "the CSR asks for identity {requested}, but the token belongs to {allowed}: request your own SPIFFE ID or none"
    )]
    IdentityMismatch { requested: String, allowed: String },
}

/// The public key of an accepted CSR, as DER SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCsr {
    pub spki_der: Vec<u8>,
    pub key_type: &'static str,
}

/// Parses PEM text into CSR DER.
pub fn csr_der_from_pem(pem: &str) -> Result<Vec<u8>, CsrError> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| CsrError::NotPem)
}

/// Checks a CSR for `identity`: its self-signature, its key type, and that it asks for nothing
/// but (optionally) that identity.
pub fn check_csr(der: &[u8], identity: &SpiffeId) -> Result<AcceptedCsr, CsrError> {
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(CsrError::Malformed(
                "trailing bytes after the request".into(),
            ));
        }
        Err(e) => return Err(CsrError::Malformed(e.to_string())),
    };
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = key_type(spki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    for attr in csr.certification_request_info.attributes() {
        if attr.oid != x509_parser::oid_registry::OID_PKCS9_EXTENSION_REQUEST {
            return Err(CsrError::ForbiddenContent(format!(
                "attribute {}",
                attr.oid
            )));
        }
    }
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            let ParsedExtension::SubjectAlternativeName(san) = ext else {
                return Err(CsrError::ForbiddenContent(describe_extension(ext)));
            };
            let mut uris = 0;
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => {
                        uris += 1;
                        if *uri != identity.to_string() {
                            return Err(CsrError::IdentityMismatch {
                                requested: (*uri).to_owned(),
                                allowed: identity.to_string(),
                            });
                        }
                    }
                    GeneralName::DNSName(d) => {
                        return Err(CsrError::ForbiddenContent(format!("DNS SAN {d:?}")));
                    }
                    GeneralName::IPAddress(_) => {
                        return Err(CsrError::ForbiddenContent("an IP SAN".into()));
                    }
                    other => {
                        return Err(CsrError::ForbiddenContent(format!("SAN {other}")));
                    }
                }
            }
            if uris > 1 {
                return Err(CsrError::ForbiddenContent(format!("{uris} URI SANs")));
            }
        }
    }
    Ok(AcceptedCsr {
        spki_der: spki.raw.to_vec(),
        key_type,
    })
}

fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<&'static str, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok("ECDSA P-256"),
            Some(c) if c == OID_NIST_EC_P384 => Ok("ECDSA P-384"),
            Some(c) => Err(CsrError::UnsupportedKey(format!("an EC key on curve {c}"))),
            None => Err(CsrError::UnsupportedKey(
                "an EC key without a named curve".into(),
            )),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok("Ed25519");
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok("RSA"),
            Ok(PublicKey::RSA(rsa)) => Err(CsrError::UnsupportedKey(format!(
                "RSA of {} bits",
                rsa.key_size()
            ))),
            _ => Err(CsrError::Malformed(
                "the RSA public key does not parse".into(),
            )),
        };
    }
    Err(CsrError::UnsupportedKey(format!("of algorithm {alg}")))
}

fn describe_extension(ext: &ParsedExtension<'_>) -> String {
    match ext {
        ParsedExtension::BasicConstraints(_) => "basicConstraints".into(),
        ParsedExtension::KeyUsage(_) => "keyUsage".into(),
        ParsedExtension::ExtendedKeyUsage(_) => "extendedKeyUsage".into(),
        ParsedExtension::UnsupportedExtension { oid } => format!("extension {oid}"),
        other => format!("extension {other:?}").chars().take(80).collect(),
    }
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
