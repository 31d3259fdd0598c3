//! `CertStore`: the one resolver both TLS configs use. The leaf is swapped atomically; the
//! store starts empty so that every handshake fails closed until the first certificate.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::{check_leaf_profile, sha256_fingerprint};
use palisade_ca_api::tls::{root_store, verify_workload_chain};
use palisade_plumbing::credentials::certified_key;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;

use crate::clock::Clock;

/// A certificate the proxy holds, with what it says about itself.
pub struct Installed {
    pub key: Arc<CertifiedKey>,
    pub spiffe_id: SpiffeId,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// SHA-256 fingerprint of the intermediate that issued the leaf (the chain's second
    /// certificate), when the chain carries one: a root rotation asks proxies whose leaf is
    /// not from the new intermediate to renew early.
    pub issuer: Option<String>,
}

/// The fingerprint of the certificate after the leaf, if any.
pub fn issuer_fingerprint(chain: &[CertificateDer<'_>]) -> Option<String> {
    chain.get(1).map(|c| sha256_fingerprint(c))
}

impl Installed {
    /// A certificate and key held elsewhere (tests, demos): checked for the mesh leaf profile.
    pub fn from_chain(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, String> {
        let leaf = chain.first().ok_or("the chain is empty")?;
        let info = check_leaf_profile(leaf).map_err(|e| e.to_string())?;
        let issuer = issuer_fingerprint(&chain);
        let key = certified_key(chain, key).map_err(|e| e.to_string())?;
        Ok(Installed {
            key: Arc::new(key),
            spiffe_id: info.spiffe_id,
            serial: info.serial,
            not_before: info.not_before.unix_timestamp(),
            not_after: info.not_after.unix_timestamp(),
            issuer,
        })
    }
}

impl std::fmt::Debug for Installed {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Holds the current leaf and key. Implements both resolver traits, so the server and client
/// configs are built once and a rotation is seen by the next handshake.
pub struct CertStore {
    current: ArcSwapOption<Installed>,
    clock: Clock,
    /// Counts installs, so that a task can wait for the next certificate instead of polling.
    installs: watch::Sender<u64>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("current", &self.current.load())
            .finish()
    }
}

impl CertStore {
    pub fn new(clock: Clock) -> Self {
        CertStore {
            current: ArcSwapOption::empty(),
            clock,
            installs: watch::Sender::new(0),
        }
    }

    pub fn install(&self, installed: Installed) {
        self.current.store(Some(Arc::new(installed)));
        self.installs.send_modify(|n| *n += 1);
    }

    /// Changes with every install.
    pub fn installs(&self) -> watch::Receiver<u64> {
        self.installs.subscribe()
    }

    /// How many certificates were installed so far: a tunnel made under one generation is
    /// not used for new streams under the next.
    pub fn generation(&self) -> u64 {
        *self.installs.borrow()
    }

    /// The proxy's clock, the one certificate validity is judged by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The installed certificate, expired or not.
    pub fn current(&self) -> Option<Arc<Installed>> {
        self.current.load_full()
    }

    /// The installed certificate when it is valid now; an expired one is never handed out.
    pub fn valid(&self) -> Option<Arc<Installed>> {
        let now = self.clock.unix();
        self.current
            .load_full()
            .filter(|c| c.not_before <= now && now < c.not_after)
    }

    /// Whether there is a valid leaf and it chains to `roots` (a bundle just adopted).
    pub fn leaf_chains_to(&self, roots: &[CertificateDer<'static>]) -> bool {
        let Some(current) = self.valid() else {
            return false;
        };
        let Ok(store) = root_store(roots) else {
            return false;
        };
        let now = UnixTime::since_unix_epoch(
            self.clock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        verify_workload_chain(Arc::new(store), &current.key.cert, now).is_ok()
    }

    fn valid_key(&self) -> Option<Arc<CertifiedKey>> {
        self.valid().map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.valid_key()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.valid_key()
    }

    fn has_certs(&self) -> bool {
        self.valid().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(not_after: i64) -> Installed {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Installed {
            key: Arc::new(certified_key(vec![cert.der().clone()], key_der).unwrap()),
            spiffe_id: SpiffeId::new("cluster.local", "shop", "web").unwrap(),
            serial: "01".into(),
            not_before: 0,
            not_after,
            issuer: None,
        }
    }

    /// The mesh watch waits on this instead of polling for the first certificate.
    #[tokio::test]
    async fn a_waiter_wakes_when_a_certificate_is_installed() {
        let store = Arc::new(CertStore::new(Clock::system()));
        let mut installs = store.installs();
        let waiter = tokio::spawn(async move {
            installs.changed().await.unwrap();
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        store.install(installed(i64::MAX));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the install")
            .unwrap();
        assert!(store.valid().is_some());
    }

    #[test]
    fn a_leaf_chains_only_to_the_roots_of_its_authority() {
        let (old, new) = (
            palisade_testkit::pki::Authority::new("old"),
            palisade_testkit::pki::Authority::new("new"),
        );
        let store = CertStore::new(Clock::system());
        assert!(!store.leaf_chains_to(&[old.root_der()]), "no leaf at all");
        let leaf = old.leaf("spiffe://cluster.local/ns/shop/sa/web");
        let installed = Installed::from_chain(leaf.chain.clone(), leaf.key()).unwrap();
        assert_eq!(
            installed.issuer.as_deref(),
            Some(sha256_fingerprint(old.intermediate.der()).as_str())
        );
        store.install(installed);
        assert!(store.leaf_chains_to(&[old.root_der()]));
        assert!(store.leaf_chains_to(&[new.root_der(), old.root_der()]));
        assert!(!store.leaf_chains_to(&[new.root_der()]));
    }
}
