//! Reading certificates: PEM, the SPIFFE ID, and the leaf profile of DESIGN.md.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeError, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no PEM certificate found: expected one or more '-----BEGIN CERTIFICATE-----' blocks")]
    NoPem,
    #[error("PEM is malformed: {0}")]
    Pem(String),
    #[error("certificate is not valid DER X.509: {0}")]
    Der(String),
    #[error("certificate carries no URI SAN: a mesh certificate carries exactly one SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate carries {0} URI SANs: a mesh certificate carries exactly one SPIFFE ID")]
    ManyUris(usize),
    #[error("certificate's URI SAN is not a Palisade identity: {0}")]
    BadSpiffeId(#[from] SpiffeError),
    #[error("certificate does not have the mesh leaf profile: {0}")]
    Profile(String),
    #[error("certificate chain is not trusted: {0}")]
    Untrusted(String),
}

/// Every certificate in a PEM text, in order.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoPem);
    }
    Ok(certs)
}

/// PEM text of one DER certificate.
/// A certificate's SHA-256 fingerprint, lowercase hex: how rotation names roots and
/// intermediates (`openssl x509 -noout -fingerprint -sha256` prints the same, upper case with
/// colons).
pub fn sha256_fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `s` is a fingerprint as [`sha256_fingerprint`] writes it.
pub fn is_sha256_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn cert_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + 70);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::Der(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(CertError::Der(e.to_string())),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Der(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID of a certificate: its one URI SAN. The only place that reads one.
pub fn spiffe_id_from_cert(der: &[u8]) -> Result<SpiffeId, CertError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    match uris.as_slice() {
        [] => Err(CertError::NoSpiffeId),
        [one] => Ok(one.parse()?),
        many => Err(CertError::ManyUris(many.len())),
    }
}

/// What a mesh leaf certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Serial (lowercase hex) and validity of any certificate.
pub fn serial_and_validity(
    der: &[u8],
) -> Result<(String, OffsetDateTime, OffsetDateTime), CertError> {
    let cert = parse(der)?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let validity = cert.validity();
    Ok((
        serial,
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    ))
}

/// Checks the leaf profile of DESIGN.md (one SPIFFE URI SAN and no other SAN, serverAuth +
/// clientAuth, digitalSignature, not a CA) and returns what the certificate says.
pub fn check_leaf_profile(der: &[u8]) -> Result<LeafInfo, CertError> {
    let cert = parse(der)?;
    let profile = |m: &str| CertError::Profile(m.to_owned());
    let spiffe_id = spiffe_id_from_cert(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Der(e.to_string()))?
        .ok_or(CertError::NoSpiffeId)?;
    if san.value.general_names.len() != 1 {
        return Err(profile("a leaf carries exactly one SAN, its SPIFFE ID"));
    }
    if cert.is_ca() {
        return Err(profile(
            "a leaf must not be a CA (basicConstraints cA=true)",
        ));
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| CertError::Der(e.to_string()))?
        .ok_or_else(|| profile("extendedKeyUsage is missing"))?;
    if !(eku.value.server_auth && eku.value.client_auth) {
        return Err(profile(
            "extendedKeyUsage must hold serverAuth and clientAuth",
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| CertError::Der(e.to_string()))?
        .ok_or_else(|| profile("keyUsage is missing"))?;
    if !ku.value.digital_signature() || ku.value.key_cert_sign() {
        return Err(profile(
            "keyUsage must be digitalSignature (and never keyCertSign)",
        ));
    }
    let (serial, not_before, not_after) = serial_and_validity(der)?;
    Ok(LeafInfo {
        spiffe_id,
        serial,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};

    fn leaf(sans: Vec<SanType>, eku: Vec<ExtendedKeyUsagePurpose>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.extended_key_usages = eku;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const BOTH: [ExtendedKeyUsagePurpose; 2] = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];

    #[test]
    fn reads_the_one_spiffe_id() {
        let der = leaf(vec![uri("spiffe://cluster.local/ns/a/sa/b")], BOTH.to_vec());
        assert_eq!(
            spiffe_id_from_cert(&der).unwrap().to_string(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
        let info = check_leaf_profile(&der).unwrap();
        assert_eq!(info.spiffe_id.service_account(), "b");
        assert!(!info.serial.is_empty());
    }

    #[test]
    fn refuses_none_or_several_ids() {
        let none = leaf(
            vec![SanType::DnsName("a.b".try_into().unwrap())],
            BOTH.to_vec(),
        );
        assert!(matches!(
            spiffe_id_from_cert(&none),
            Err(CertError::NoSpiffeId)
        ));
        let two = leaf(
            vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")],
            BOTH.to_vec(),
        );
        assert!(matches!(
            spiffe_id_from_cert(&two),
            Err(CertError::ManyUris(2))
        ));
        let bad = leaf(vec![uri("https://example.com/x")], BOTH.to_vec());
        assert!(matches!(
            spiffe_id_from_cert(&bad),
            Err(CertError::BadSpiffeId(_))
        ));
    }

    #[test]
    fn profile_requires_both_ekus_and_a_single_san() {
        let server_only = leaf(
            vec![uri("spiffe://td/ns/a/sa/b")],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        );
        assert!(
            check_leaf_profile(&server_only)
                .unwrap_err()
                .to_string()
                .contains("clientAuth")
        );
        let extra_dns = leaf(
            vec![
                uri("spiffe://td/ns/a/sa/b"),
                SanType::DnsName("x.y".try_into().unwrap()),
            ],
            BOTH.to_vec(),
        );
        assert!(
            check_leaf_profile(&extra_dns)
                .unwrap_err()
                .to_string()
                .contains("exactly one SAN")
        );
    }

    #[test]
    fn pem_round_trip_and_errors() {
        let der = leaf(vec![uri("spiffe://td/ns/a/sa/b")], BOTH.to_vec());
        let pem = cert_to_pem(&der);
        let parsed = parse_pem_certs(&format!("{pem}{pem}")).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].as_ref(), der.as_slice());
        assert!(matches!(parse_pem_certs("hello"), Err(CertError::NoPem)));
        assert!(
            parse_pem_certs("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        assert!(matches!(
            spiffe_id_from_cert(b"garbage"),
            Err(CertError::Der(_))
        ));
    }
}
