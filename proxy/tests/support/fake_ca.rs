//! A scriptable in-process CA: a root, an intermediate, and leaves minted per test.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_ca_api::wire::{CertificateRequest, CertificateResponse};
use palisade_proxy::clock::Clock;
use palisade_proxy::source::{BoxFuture, CertificateSource, SourceError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

pub struct Authority {
    pub root: CertifiedIssuer<'static, KeyPair>,
    pub intermediate: CertifiedIssuer<'static, KeyPair>,
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

/// Leaf parameters of the mesh profile.
pub fn leaf_params(
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

/// A leaf with its key, as a peer would hold it.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Authority {
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

    /// A leaf for `id` valid from `from` to `until` (relative to now, seconds).
    pub fn leaf_between(&self, id: &str, from: i64, until: i64) -> Leaf {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().unwrap();
        let cert = leaf_params(
            id,
            now + time::Duration::seconds(from),
            now + time::Duration::seconds(until),
        )
        .signed_by(&key, &self.intermediate)
        .unwrap();
        Leaf {
            chain: vec![cert.der().clone(), self.intermediate.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A leaf for `id` valid for an hour.
    pub fn leaf(&self, id: &str) -> Leaf {
        self.leaf_between(id, -60, 3600)
    }

    /// Signs a CSR as the real CA would (validity from `clock`), with the CSR's SANs.
    pub fn sign_csr(&self, csr: &str, clock: &Clock, ttl: Duration) -> String {
        self.sign_csr_as(csr, clock, ttl, None)
    }

    /// Signs a CSR's key, for `id` instead of what the CSR asks when given.
    pub fn sign_csr_as(&self, csr: &str, clock: &Clock, ttl: Duration, id: Option<&str>) -> String {
        let mut req = CertificateSigningRequestParams::from_pem(csr).unwrap();
        let now = OffsetDateTime::from(clock.now());
        let sans = req.params.subject_alt_names.clone();
        let mut params = leaf_params(
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

/// A self-signed certificate claiming a mesh identity.
pub fn self_signed_leaf(id: &str) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let cert = leaf_params(
        id,
        now - time::Duration::seconds(60),
        now + time::Duration::hours(1),
    )
    .self_signed(&key)
    .unwrap();
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// What the fake CA does with the next request.
pub enum Answer {
    /// Sign the CSR with this lifetime.
    Issue(Duration),
    /// Fail with this error.
    Fail(SourceError),
    /// Answer anything the test builds from the CSR.
    Custom(Box<dyn Fn(&str) -> CertificateResponse + Send + Sync>),
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub token: String,
    pub csr: String,
    pub at: tokio::time::Instant,
}

pub struct FakeCa {
    pub authority: Authority,
    pub clock: Clock,
    script: Mutex<VecDeque<Answer>>,
    /// What to do when the script is exhausted.
    pub default: Mutex<Answer>,
    pub seen: Mutex<Vec<Seen>>,
    pub extra_roots: Mutex<Vec<String>>,
}

impl FakeCa {
    pub fn new(clock: Clock) -> Arc<Self> {
        Arc::new(FakeCa {
            authority: Authority::new("palisade test"),
            clock,
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Answer::Issue(Duration::from_secs(3600))),
            seen: Mutex::new(Vec::new()),
            extra_roots: Mutex::new(Vec::new()),
        })
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    pub fn set_default(&self, answer: Answer) {
        *self.default.lock().unwrap() = answer;
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn response_for(&self, leaf_pem: String) -> CertificateResponse {
        let mut bundle = vec![self.authority.root_pem()];
        bundle.extend(self.extra_roots.lock().unwrap().iter().cloned());
        CertificateResponse {
            spiffe_id: String::new(),
            certificate_chain: vec![leaf_pem, self.authority.intermediate.pem()],
            trust_bundle: bundle,
            expires_at: String::new(),
        }
    }

    fn answer(&self, csr: &str, answer: &Answer) -> Result<CertificateResponse, SourceError> {
        match answer {
            Answer::Issue(ttl) => {
                Ok(self.response_for(self.authority.sign_csr(csr, &self.clock, *ttl)))
            }
            Answer::Fail(e) => Err(e.clone()),
            Answer::Custom(f) => Ok(f(csr)),
        }
    }
}

pub fn unreachable() -> SourceError {
    SourceError::Transport("connection refused".into())
}

impl CertificateSource for FakeCa {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(Seen {
                token: token.to_owned(),
                csr: req.csr.clone(),
                at: tokio::time::Instant::now(),
            });
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(a) => self.answer(&req.csr, &a),
                None => self.answer(&req.csr, &self.default.lock().unwrap()),
            }
        })
    }
}
