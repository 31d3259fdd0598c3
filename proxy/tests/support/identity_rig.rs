//! An [`Identity`] over the fake CA, on a clock that moves with tokio's (paused) clock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use palisade_proxy::clock::Clock;
use palisade_proxy::identity::{AnchorsFile, CertStore, EarlyRenewal, Identity, IdentityConfig};
use palisade_proxy::metrics::Metrics;
use palisade_proxy::tls::TrustBundle;

use super::fake_ca::FakeCa;

pub const ME: &str = "spiffe://cluster.local/ns/shop/sa/web";

pub struct Rig {
    pub ca: Arc<FakeCa>,
    pub identity: Arc<Identity>,
    pub dir: tempfile::TempDir,
    pub token: PathBuf,
}

/// A proxy identity trusting the fake CA's root, with no certificate yet.
pub fn rig() -> Rig {
    rig_with_anchors(None)
}

/// As [`rig`], with an anchors file polled every `anchors_poll` when given: it holds the fake
/// CA's root, at `<dir>/anchors.pem`.
pub fn rig_with_anchors(anchors_poll: Option<Duration>) -> Rig {
    let clock = Clock::anchored(SystemTime::now());
    let ca = FakeCa::new(clock.clone());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "token-1\n").unwrap();
    let trust_anchors = anchors_poll.map(|poll| {
        let path = dir.path().join("anchors.pem");
        std::fs::write(&path, ca.authority.root_pem()).unwrap();
        AnchorsFile {
            path,
            poll,
            loaded: ca.authority.root_pem().into_bytes(),
        }
    });
    let store = Arc::new(CertStore::new(clock.clone()));
    let bundle = Arc::new(TrustBundle::new(vec![ca.authority.root_der()]).unwrap());
    let identity = Arc::new(Identity {
        config: IdentityConfig {
            spiffe_id: ME.parse().unwrap(),
            token_file: token.clone(),
            ttl_seconds: None,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            trust_anchors,
        },
        early: Arc::new(EarlyRenewal::new(store.clone())),
        store,
        bundle,
        source: ca.clone(),
        metrics: Arc::new(Metrics::new()),
        clock,
    });
    Rig {
        ca,
        identity,
        dir,
        token,
    }
}
