use super::*;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};

const ME: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn me() -> SpiffeId {
    ME.parse().unwrap()
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn openssl_csr(newkey: &str) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            newkey,
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/O=t",
            "-outform",
            "DER",
        ])
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn accepts_p256_with_or_without_own_id() {
    let key = KeyPair::generate().unwrap();
    assert_eq!(
        check_csr(&csr_with(&key, vec![]), &me()).unwrap().key_type,
        "ECDSA P-256"
    );
    assert!(check_csr(&csr_with(&key, vec![uri(ME)]), &me()).is_ok());
}

#[test]
fn accepts_p384_and_ed25519() {
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert_eq!(
        check_csr(&csr_with(&p384, vec![]), &me()).unwrap().key_type,
        "ECDSA P-384"
    );
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    assert_eq!(
        check_csr(&csr_with(&ed, vec![]), &me()).unwrap().key_type,
        "Ed25519"
    );
}

#[test]
fn rsa_needs_2048_bits() {
    assert_eq!(
        check_csr(&openssl_csr("rsa:2048"), &me()).unwrap().key_type,
        "RSA"
    );
    let err = check_csr(&openssl_csr("rsa:1024"), &me()).unwrap_err();
    assert!(
        matches!(err, CsrError::UnsupportedKey(ref k) if k.contains("1024")),
        "{err}"
    );
}

#[test]
fn refuses_other_curves() {
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("k1.pem");
    let ok = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "secp256k1", "-out"])
        .arg(&params)
        .status()
        .unwrap();
    assert!(ok.success());
    let csr = openssl_csr(&format!("ec:{}", params.display()));
    let err = check_csr(&csr, &me()).unwrap_err();
    assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");
}

#[test]
fn refuses_a_csr_signed_by_another_key() {
    let key = KeyPair::generate().unwrap();
    let mut der = csr_with(&key, vec![]);
    // Replace the public key with another one: the signature no longer matches it.
    let other = KeyPair::generate().unwrap();
    let (old, new) = (
        key.public_key_raw().to_vec(),
        other.public_key_raw().to_vec(),
    );
    let at = der
        .windows(old.len())
        .position(|w| w == old.as_slice())
        .unwrap();
    der[at..at + new.len()].copy_from_slice(&new);
    assert_eq!(check_csr(&der, &me()).unwrap_err(), CsrError::BadSignature);
}

#[test]
fn refuses_another_identity() {
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, vec![uri("spiffe://cluster.local/ns/shop/sa/admin")]);
    let err = check_csr(&csr, &me()).unwrap_err();
    assert!(matches!(err, CsrError::IdentityMismatch { .. }));
    assert!(err.to_string().contains("request your own SPIFFE ID"));
}

#[test]
fn refuses_dns_ip_and_extra_sans() {
    let key = KeyPair::generate().unwrap();
    for sans in [
        vec![SanType::DnsName("web.shop.svc".try_into().unwrap())],
        vec![SanType::IpAddress("10.0.0.1".parse().unwrap())],
        vec![uri(ME), SanType::DnsName("x.y".try_into().unwrap())],
        vec![uri(ME), uri(ME)],
    ] {
        let err = check_csr(&csr_with(&key, sans.clone()), &me()).unwrap_err();
        assert!(
            matches!(err, CsrError::ForbiddenContent(_)),
            "{sans:?}: {err}"
        );
    }
}

#[test]
fn refuses_other_extensions() {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let der = p.serialize_request(&key).unwrap().der().to_vec();
    let err = check_csr(&der, &me()).unwrap_err();
    assert!(
        matches!(err, CsrError::ForbiddenContent(ref w) if w.contains("extendedKeyUsage")),
        "{err}"
    );
}

#[test]
fn refuses_garbage() {
    assert_eq!(
        csr_der_from_pem("not pem at all").unwrap_err(),
        CsrError::NotPem
    );
    assert!(matches!(
        check_csr(b"\x30\x03\x02\x01\x00", &me()),
        Err(CsrError::Malformed(_))
    ));
    let key = KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    assert!(check_csr(&csr_der_from_pem(&pem).unwrap(), &me()).is_ok());
}
