//! Signing: leaf certificates of the DESIGN.md profile, issued by the intermediate.

use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::cert_to_pem;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::keys::{KeyError, KeyMaterial, random_serial};

/// Leaves are back-dated this much to absorb clock skew between nodes.
pub const BACKDATE: Duration = Duration::seconds(60);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the CSR's public key cannot be used: {0}")]
    PublicKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// One issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub der: CertificateDer<'static>,
    pub pem: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The intermediate's signing key with what it publishes. Cheap to share behind an `Arc`.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediate PEMs, issuing one first: the tail of every chain handed out.
    chain_tail: Vec<String>,
    /// The same intermediates as DER, for the CA's own serving chain.
    chain_tail_der: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// The same roots, for verifying the client chains of mesh watches.
    root_store: std::sync::Arc<rustls::RootCertStore>,
    bundle_pem: Vec<String>,
    intermediate_not_after: OffsetDateTime,
    root_not_after: OffsetDateTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// `extra_roots` join the trust bundle (e.g. the next root during a root rotation).
    pub fn new(
        material: KeyMaterial,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, KeyError> {
        let issuer = material.issuer()?;
        let mut roots = material.roots;
        for r in extra_roots {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
        let root_store = palisade_ca_api::tls::root_store(&roots)
            .map_err(|e| KeyError::Generate(format!("trust bundle: {e}")))?;
        Ok(Authority {
            root_store: std::sync::Arc::new(root_store),
            root_not_after: material.root_not_after,
            issuer,
            chain_tail: material
                .intermediates
                .iter()
                .map(|c| cert_to_pem(c))
                .collect(),
            chain_tail_der: material.intermediates.clone(),
            bundle_pem: roots.iter().map(|c| cert_to_pem(c)).collect(),
            roots,
            intermediate_not_after: material.intermediate_not_after,
        })
    }

    pub fn trust_bundle_pem(&self) -> &[String] {
        &self.bundle_pem
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn chain_tail(&self) -> &[String] {
        &self.chain_tail
    }

    pub fn chain_tail_der(&self) -> &[CertificateDer<'static>] {
        &self.chain_tail_der
    }

    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    /// The expiry of the root that issued the signing intermediate.
    pub fn root_not_after(&self) -> OffsetDateTime {
        self.root_not_after
    }

    pub fn root_store(&self) -> std::sync::Arc<rustls::RootCertStore> {
        self.root_store.clone()
    }

    /// Signs a workload leaf for `id` over the public key of an accepted CSR.
    pub fn issue_leaf(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, SignError> {
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| SignError::PublicKey(e.to_string()))?;
        let params = self.leaf_params(id, Vec::new(), ttl, now)?;
        self.sign(params, &public_key)
    }

    /// The CA's own serving certificate: its SPIFFE ID plus DNS names, over a key it keeps.
    pub fn issue_server(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        key: &KeyPair,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, SignError> {
        let params = self.leaf_params(id, dns_names.to_vec(), ttl, now)?;
        self.sign(params, key)
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        dns_names: Vec<String>,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateParams, SignError> {
        // Certificates carry whole seconds; so does everything reported about them.
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::OrganizationName,
            format!("Palisade {}", id.trust_domain()),
        );
        p.distinguished_name = dn;
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        for name in dns_names {
            let dns = name
                .try_into()
                .map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?;
            p.subject_alt_names.push(SanType::DnsName(dns));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - BACKDATE;
        // Never past the intermediate: a leaf outliving its issuer would not verify.
        p.not_after = (now + ttl).min(self.intermediate_not_after);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }

    fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Issued, SignError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.as_ref().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        let der = cert.der().clone();
        Ok(Issued {
            pem: cert_to_pem(&der),
            der,
            serial,
            not_after: params.not_after,
        })
    }
}
