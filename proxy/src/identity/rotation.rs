//! Getting and renewing the proxy's certificate: a fresh key per request, the token read
//! afresh, the answer verified before it is installed, renewal at half-life with jitter, and
//! capped exponential backoff on failure.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::check_leaf_profile;
use palisade_ca_api::tls::verify_workload_chain;
use palisade_ca_api::wire::CertificateRequest;
use palisade_plumbing::credentials::certified_key;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;

use super::anchors::AnchorsFile;
use super::early::EarlyRenewal;
use super::schedule::{jittered_backoff, renew_at};
use super::store::{CertStore, Installed, issuer_fingerprint};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::source::{CertificateSource, SourceError};
use crate::tls::{Offer, TrustBundle, parse_pem_list};

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub spiffe_id: SpiffeId,
    pub token_file: PathBuf,
    /// Lifetime to ask for; the CA's default when `None`.
    pub ttl_seconds: Option<u64>,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Polled for new roots when present (`PALISADE_TRUST_ANCHORS`).
    pub trust_anchors: Option<AnchorsFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "cannot read the service-account token file {path}: {source}; check the projected token volume (PALISADE_TOKEN_FILE)"
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the service-account token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot make a key or CSR: {0}")]
    Csr(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the CA's answer was refused: {0}")]
    BadAnswer(String),
    #[error("the CA issued a certificate for {got}, but this proxy is {want}")]
    WrongIdentity { got: String, want: String },
}

impl IdentityError {
    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IdentityError::TokenFile { .. } | IdentityError::EmptyToken(_) => "token",
            IdentityError::Csr(_) => "csr",
            IdentityError::Source(SourceError::Api { .. }) => "ca_error",
            IdentityError::Source(SourceError::Transport(_)) => "ca_unreachable",
            IdentityError::BadAnswer(_) | IdentityError::WrongIdentity { .. } => "bad_answer",
        }
    }
}

/// Everything needed to get a certificate and install it.
pub struct Identity {
    pub config: IdentityConfig,
    pub store: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub source: Arc<dyn CertificateSource>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// Asks for a renewal before the schedule's moment.
    pub early: Arc<EarlyRenewal>,
}

impl Identity {
    /// One request: new key, CSR, token, answer verified, then installed.
    pub async fn renew_once(&self) -> Result<Arc<Installed>, IdentityError> {
        let token = read_token(&self.config.token_file).await?;
        // A fresh key for every request; it lives only in memory.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let csr = make_csr(&self.config.spiffe_id, &key)?;
        // The roots this request's connection is verified against.
        let generation = self.bundle.generation();
        let answer = self
            .source
            .request_certificate(
                &token,
                &CertificateRequest {
                    csr,
                    ttl_seconds: self.config.ttl_seconds,
                },
            )
            .await?;

        let bad = |m: String| IdentityError::BadAnswer(m);
        let chain = parse_pem_list(&answer.certificate_chain)
            .map_err(|e| bad(format!("certificate_chain: {e}")))?;
        let offered =
            parse_pem_list(&answer.trust_bundle).map_err(|e| bad(format!("trust_bundle: {e}")))?;
        let mut offer = self.bundle.judge_offer(offered);
        if let Offer::Adopt(roots) = &offer
            && let Err(e) = palisade_ca_api::tls::root_store(roots)
        {
            // Not a reason to refuse the leaf: it may well chain to a root held now.
            tracing::warn!(error = %e, "the CA's trust bundle holds an unusable root; keeping the current bundle");
            offer = Offer::Keep;
        }
        let bundle = match &offer {
            Offer::Adopt(roots) => roots.clone(),
            Offer::Keep => self.bundle.ders().as_ref().clone(),
            Offer::Refuse => {
                tracing::warn!(
                    "the CA's trust bundle shares no root with the current one; keeping the current bundle"
                );
                self.bundle.ders().as_ref().clone()
            }
        };
        let roots = palisade_ca_api::tls::root_store(&bundle)
            .map_err(|e| bad(format!("trust bundle: {e}")))?;
        let now = UnixTime::since_unix_epoch(
            self.clock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let id =
            verify_workload_chain(Arc::new(roots), &chain, now).map_err(|e| bad(e.to_string()))?;
        if id != self.config.spiffe_id {
            return Err(IdentityError::WrongIdentity {
                got: id.to_string(),
                want: self.config.spiffe_id.to_string(),
            });
        }
        let info = check_leaf_profile(&chain[0]).map_err(|e| bad(e.to_string()))?;
        let issuer = issuer_fingerprint(&chain);

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = certified_key(chain, key)
            .map_err(|e| bad(format!("the certificate is not for the key we sent: {e}")))?;

        if let Offer::Adopt(roots) = offer {
            let adopted = self
                .bundle
                .replace_at(generation, roots)
                .map_err(|e| bad(format!("trust bundle: {e}")))?;
            if !adopted {
                return Err(bad(
                    "the trust bundle changed while the request was under way; asking again over a connection verified against the new roots".into(),
                ));
            }
        }
        let installed = Installed {
            key: Arc::new(certified),
            spiffe_id: id,
            serial: info.serial,
            not_before: info.not_before.unix_timestamp(),
            not_after: info.not_after.unix_timestamp(),
            issuer,
        };
        self.store.install(installed);
        let current = self.store.current().expect("just installed");
        self.metrics.certificate_installed(current.not_after);
        Ok(current)
    }
}

async fn read_token(path: &PathBuf) -> Result<String, IdentityError> {
    let token =
        tokio::fs::read_to_string(path)
            .await
            .map_err(|source| IdentityError::TokenFile {
                path: path.clone(),
                source,
            })?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(IdentityError::EmptyToken(path.clone()));
    }
    Ok(token)
}

fn make_csr(id: &SpiffeId, key: &KeyPair) -> Result<String, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| IdentityError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| IdentityError::Csr(e.to_string()))
}

/// A number in `0.0..=1.0` from the system's random source.
pub(super) fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    u32::from_le_bytes(b) as f64 / u32::MAX as f64
}

/// A number in `-1.0..=1.0` from the system's random source.
fn random_jitter() -> f64 {
    random_unit() * 2.0 - 1.0
}

/// Keeps the store filled until `shutdown` turns true: renews on the schedule, or earlier when
/// [`EarlyRenewal`] is asked.
pub async fn run_rotation(identity: Arc<Identity>, mut shutdown: watch::Receiver<bool>) {
    let mut attempt: u32 = 0;
    let mut expiry_reported = false;
    let mut asks = identity.early.subscribe();
    loop {
        let seen = *asks.borrow_and_update();
        let outcome = identity.renew_once().await;
        identity.early.answered(&seen);
        let wait = match outcome {
            Ok(installed) => {
                attempt = 0;
                expiry_reported = false;
                identity.metrics.rotation_succeeded();
                let now = identity.clock.unix();
                let at = renew_at(
                    installed.not_before,
                    installed.not_after,
                    now,
                    random_jitter(),
                );
                let secs = (at - now).max(1) as u64;
                tracing::info!(
                    spiffe_id = %installed.spiffe_id,
                    serial = %installed.serial,
                    not_after = installed.not_after,
                    renew_in_seconds = secs,
                    "certificate installed"
                );
                Duration::from_secs(secs)
            }
            Err(e) => {
                identity.metrics.rotation_failed();
                let mut wait = jittered_backoff(
                    attempt,
                    identity.config.backoff_base,
                    identity.config.backoff_cap,
                );
                attempt = attempt.saturating_add(1);
                let current = identity.store.current();
                let now = identity.clock.unix();
                match current {
                    Some(c) if now < c.not_after => {
                        tracing::warn!(error = %e, kind = e.kind(), retry_in_ms = wait.as_millis() as u64,
                            serving_until = c.not_after, "certificate renewal failed; the current certificate keeps serving");
                        // Wake up at expiry to report it, whatever the backoff says.
                        let to_expiry = Duration::from_secs((c.not_after - now).max(0) as u64);
                        wait = wait.min(to_expiry + Duration::from_secs(1));
                    }
                    Some(c) => {
                        if !expiry_reported {
                            tracing::error!(error = %e, expired_at = c.not_after,
                                "the certificate has expired and could not be renewed: it is no longer presented and the proxy is not ready");
                            expiry_reported = true;
                        } else {
                            tracing::warn!(error = %e, kind = e.kind(), retry_in_ms = wait.as_millis() as u64, "certificate request failed; still not ready");
                        }
                    }
                    None => {
                        tracing::warn!(error = %e, kind = e.kind(), retry_in_ms = wait.as_millis() as u64,
                            "no certificate yet: the proxy is not ready until the CA issues one");
                    }
                }
                wait
            }
        };
        let scheduled = tokio::time::Instant::now() + wait;
        // The identity holds the sender, so the channel stays open; if not, the schedule holds.
        let mut asks_open = true;
        loop {
            let at = asks
                .borrow_and_update()
                .by
                .map_or(scheduled, |by| by.min(scheduled));
            tokio::select! {
                _ = tokio::time::sleep_until(at) => break,
                changed = asks.changed(), if asks_open => asks_open = changed.is_ok(),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}
