//! Test certificates minted with rcgen: a root and an intermediate, mesh leaves carrying a
//! SPIFFE URI SAN, serving certificates for names, self-signed leaves and CSRs.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// A root and an intermediate under it; leaves are signed by the intermediate.
pub struct Authority {
    pub root: CertifiedIssuer<'static, KeyPair>,
    pub intermediate: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its key, as a peer or a server would hold it.
pub struct Leaf {
    /// The leaf first, then the intermediate when there is one.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// `chain` as PEM, what a certificate file holds.
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The DER of the end-entity certificate.
    pub fn der(&self) -> &[u8] {
        &self.chain[0]
    }

    fn new(
        cert: &rcgen::Certificate,
        key: &KeyPair,
        issuer: Option<&CertifiedIssuer<'static, KeyPair>>,
    ) -> Leaf {
        let mut chain = vec![cert.der().clone()];
        let mut cert_pem = cert.pem();
        if let Some(issuer) = issuer {
            chain.push(issuer.der().clone());
            cert_pem.push_str(&issuer.pem());
        }
        Leaf {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem,
            key_pem: key.serialize_pem(),
        }
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    p
}

/// Leaf parameters of the mesh profile: the SPIFFE ID `id` as the only SAN, server and client
/// auth, digital signature.
pub fn mesh_leaf_params(
    id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = not_before;
    p.not_after = not_after;
    p.use_authority_key_identifier_extension = true;
    p
}

impl Authority {
    /// A root `<name> root` and an intermediate `<name> intermediate`, valid for 30 days.
    pub fn new(name: &str) -> Self {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root")),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate")),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        Authority { root, intermediate }
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A mesh leaf for `id` valid from `from` to `until` (relative to now, seconds).
    pub fn leaf_between(&self, id: &str, from: i64, until: i64) -> Leaf {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().unwrap();
        let cert = mesh_leaf_params(
            id,
            now + time::Duration::seconds(from),
            now + time::Duration::seconds(until),
        )
        .signed_by(&key, &self.intermediate)
        .unwrap();
        Leaf::new(&cert, &key, Some(&self.intermediate))
    }

    /// A mesh leaf for `id` valid for an hour.
    pub fn leaf(&self, id: &str) -> Leaf {
        self.leaf_between(id, -60, 3600)
    }

    /// A serving certificate for `names` (DNS names or IP addresses), as a webhook holds one.
    pub fn server_leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.intermediate)
            .unwrap();
        Leaf::new(&cert, &key, Some(&self.intermediate))
    }

    /// Signs a CSR's key as the real CA would (valid from a minute before `now` for `ttl`),
    /// for `id` when given, else with the SANs the CSR asks for. Returns the leaf's PEM.
    pub fn sign_csr(&self, csr: &str, now: SystemTime, ttl: Duration, id: Option<&str>) -> String {
        let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
        let now = OffsetDateTime::from(now);
        let sans = req.params.subject_alt_names.clone();
        let mut params = mesh_leaf_params(
            id.unwrap_or("spiffe://x/ns/x/sa/x"),
            now - time::Duration::seconds(60),
            now + ttl,
        );
        if id.is_none() {
            params.subject_alt_names = sans;
        }
        req.params = params;
        req.signed_by(&self.intermediate).unwrap().pem()
    }
}

/// A self-signed certificate of the mesh profile claiming `id`, valid for an hour.
pub fn self_signed_leaf(id: &str) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let cert = mesh_leaf_params(
        id,
        now - time::Duration::seconds(60),
        now + time::Duration::hours(1),
    )
    .self_signed(&key)
    .unwrap();
    Leaf::new(&cert, &key, None)
}

/// A PEM certificate request for `key` with `sans` and nothing else.
pub fn csr_pem(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().pem().unwrap()
}

/// A SPIFFE URI SAN.
pub fn spiffe_san(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

/// A webhook's serving certificate as the chart makes it (`genCA`, then `genSignedCert`): a CA
/// and a certificate for `names` under it, both PEM.
pub struct WebhookPki {
    pub ca_pem: String,
    pub cert_pem: String,
}

/// [`WebhookPki`] whose serving certificate expires `valid_days` from now (negative: expired).
pub fn webhook_serving(names: &[&str], valid_days: i64) -> WebhookPki {
    let now = OffsetDateTime::now_utc();
    // Long-lived, as a chart-made certificate: issued a year ago.
    let from = now - time::Duration::days(365 + valid_days.abs());
    webhook_serving_at(names, from, now + time::Duration::days(valid_days))
}

/// A webhook CA and serving certificate valid from `from_hours` to `to_hours` around now.
pub fn webhook_serving_between(names: &[&str], from_hours: i64, to_hours: i64) -> WebhookPki {
    let now = OffsetDateTime::now_utc();
    webhook_serving_at(
        names,
        now + time::Duration::hours(from_hours),
        now + time::Duration::hours(to_hours),
    )
}

fn webhook_serving_at(
    names: &[&str],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> WebhookPki {
    let ca = CertifiedIssuer::self_signed(
        ca_params("palisade-injector-ca"),
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&KeyPair::generate().unwrap(), &ca)
        .unwrap();
    WebhookPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
    }
}
