//! The proxy's side of a root or intermediate rotation: a bundle on the mesh watch adopted
//! under the continuity rule and confirmed by reopening the watch with its roots, the watch
//! reopened when a new certificate is installed, early renewal when the CA asks for it, and
//! recovery from a rewritten anchors file.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::cert::sha256_fingerprint;
use palisade_ca_api::wire::WatchQuery;
use palisade_ca_api::wire::{CertificateResponse, RenewRequest};
use palisade_proxy::identity::{CertStore, run_rotation, watch_anchors};
use palisade_proxy::mesh::{Credentials, MeshConfig, MeshView, run_watch};
use palisade_proxy::source::{BoxFuture, MeshWatcher, SourceError, WatchEvents};
use palisade_testkit::pki::Authority;
use support::fake_ca::Answer;
use support::fake_mesh::FakeMesh;
use support::identity_rig::{ME, Rig, rig, rig_with_anchors};
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sorted_fingerprints(authorities: &[&Authority]) -> Vec<String> {
    let mut v: Vec<String> = authorities
        .iter()
        .map(|a| sha256_fingerprint(&a.root_der()))
        .collect();
    v.sort();
    v
}

/// A mesh view holding the rig's credentials, following `source`'s watch.
fn follow_watch(
    r: &Rig,
    source: Arc<dyn MeshWatcher>,
    stopped: watch::Receiver<bool>,
) -> (Arc<MeshView>, JoinHandle<()>) {
    let ip: IpAddr = "10.77.0.2".parse().unwrap();
    let view = Arc::new(
        MeshView::new(MeshConfig {
            pod_ip: Some(ip),
            ..MeshConfig::default()
        })
        .with_credentials(Credentials {
            store: r.identity.store.clone(),
            bundle: r.identity.bundle.clone(),
            early: r.identity.early.clone(),
        }),
    );
    let task = tokio::spawn(run_watch(view.clone(), source, stopped));
    (view, task)
}

/// Opens watches as the CA client does: only with a valid certificate to present, waiting for
/// one if need be.
struct NeedsLeaf {
    inner: Arc<dyn MeshWatcher>,
    store: Arc<CertStore>,
}

impl MeshWatcher for NeedsLeaf {
    fn watch<'a>(
        &'a self,
        query: &'a WatchQuery,
    ) -> BoxFuture<'a, Result<Box<dyn WatchEvents>, SourceError>> {
        Box::pin(async move {
            let mut installs = self.store.installs();
            while self.store.valid().is_none() {
                installs
                    .changed()
                    .await
                    .map_err(|_| SourceError::Transport("gone".into()))?;
            }
            self.inner.watch(query).await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_bundle_on_the_watch_is_adopted_when_it_keeps_a_root_and_confirmed_by_a_reopen() {
    let r = rig();
    r.identity.renew_once().await.unwrap();
    let current = &r.ca.authority;
    let (next, unrelated) = (Authority::new("next"), Authority::new("unrelated"));
    let fake = FakeMesh::new();
    let (stop, stopped) = watch::channel(false);
    let (_view, task) = follow_watch(&r, fake.source(), stopped);
    tokio::time::sleep(ms(50)).await;
    assert_eq!(fake.watches(), 1);
    assert_eq!(
        fake.last_query().unwrap().roots,
        sorted_fingerprints(&[current])
    );

    // The CA adds the next root: adopted, and the next watch says both.
    fake.set_trust_bundle(vec![current.root_pem(), next.root_pem()]);
    tokio::time::sleep(ms(50)).await;
    assert_eq!(
        *r.identity.bundle.ders(),
        vec![current.root_der(), next.root_der()]
    );
    assert_eq!(fake.watches(), 2, "reopened once, to confirm the new roots");
    assert_eq!(
        fake.last_query().unwrap().roots,
        sorted_fingerprints(&[current, &next])
    );

    // A bundle sharing no root with the current one is refused; so is one that is not PEM.
    fake.set_trust_bundle(vec![unrelated.root_pem()]);
    tokio::time::sleep(ms(50)).await;
    fake.set_trust_bundle(vec!["-----BEGIN CERTIFICATE-----\nnot base64\n".into()]);
    tokio::time::sleep(ms(50)).await;
    assert_eq!(
        *r.identity.bundle.ders(),
        vec![current.root_der(), next.root_der()]
    );
    assert_eq!(fake.watches(), 2);
    assert_eq!(
        fake.last_query().unwrap().roots,
        sorted_fingerprints(&[current, &next])
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Lets every task run until it waits. Used instead of a sleep where a busy loop is the bug
/// looked for: a busy loop never lets the paused clock advance, so a sleep would hang rather
/// than fail.
async fn settle() {
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_certificate_reopens_the_watch_once_with_the_same_query() {
    let r = rig();
    r.identity.renew_once().await.unwrap();
    let fake = FakeMesh::new();
    let (stop, stopped) = watch::channel(false);
    let (_view, task) = follow_watch(&r, fake.source(), stopped);
    settle().await;
    assert_eq!(fake.watches(), 1);

    r.identity.renew_once().await.unwrap();
    settle().await;
    assert_eq!(
        fake.watches(),
        2,
        "the CA must see the new leaf on the watch"
    );
    let queries = fake.queries.lock().unwrap().clone();
    assert_eq!(queries[0], queries[1]);
    // One reopen per install, not a loop.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fake.watches(), 2);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_waited_for_the_first_certificate_is_not_reopened_for_it() {
    let r = rig();
    let fake = FakeMesh::new();
    let source = Arc::new(NeedsLeaf {
        inner: fake.source(),
        store: r.identity.store.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    let (_view, task) = follow_watch(&r, source, stopped);
    tokio::time::sleep(ms(50)).await;
    assert_eq!(fake.watches(), 0);
    r.identity.renew_once().await.unwrap();
    tokio::time::sleep(ms(50)).await;
    assert_eq!(fake.watches(), 1, "opened with the first certificate, once");
    r.identity.renew_once().await.unwrap();
    tokio::time::sleep(ms(50)).await;
    assert_eq!(fake.watches(), 2, "a later certificate reopens it");
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// The rotation task and the watch, running; returns once the first certificate is in.
async fn rotating(r: &Rig, fake: &Arc<FakeMesh>) -> (watch::Sender<bool>, Vec<JoinHandle<()>>) {
    let (stop, stopped) = watch::channel(false);
    let rotation = tokio::spawn(run_rotation(r.identity.clone(), stopped.clone()));
    tokio::time::sleep(ms(10)).await;
    assert_eq!(r.ca.requests(), 1);
    let (_view, follow) = follow_watch(r, fake.source(), stopped);
    tokio::time::sleep(ms(10)).await;
    (stop, vec![rotation, follow])
}

async fn stop_all(stop: watch::Sender<bool>, tasks: Vec<JoinHandle<()>>) {
    stop.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_renew_request_naming_another_intermediate_renews_once_within_its_window() {
    let r = rig();
    let fake = FakeMesh::new();
    let (stop, tasks) = rotating(&r, &fake).await;
    let next = Authority::new("next");
    fake.set_renew(Some(RenewRequest {
        unless_issued_by: sha256_fingerprint(next.intermediate.der()),
        within_seconds: 1,
    }));
    tokio::time::sleep(ms(1_100)).await;
    assert_eq!(r.ca.requests(), 2, "renewed within the second asked");

    // The fake CA still signs with the old intermediate, and every message repeats the
    // request: one renewal per request all the same, then the schedule (half-life of an hour).
    for _ in 0..5 {
        fake.touch();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(r.ca.requests(), 2);
    stop_all(stop, tasks).await;
}

#[tokio::test(start_paused = true)]
async fn a_renew_request_naming_the_own_issuer_changes_nothing() {
    let r = rig();
    let fake = FakeMesh::new();
    let (stop, tasks) = rotating(&r, &fake).await;
    let own = r.identity.store.current().unwrap().issuer.clone().unwrap();
    assert_eq!(own, sha256_fingerprint(r.ca.authority.intermediate.der()));
    fake.set_renew(Some(RenewRequest {
        unless_issued_by: own,
        within_seconds: 1,
    }));
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(r.ca.requests(), 1);
    stop_all(stop, tasks).await;
}

/// Replaces `path` as the kubelet does: a new file, then a symlink swapped over the old one.
fn kubelet_write(dir: &Path, path: &Path, content: &str) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let data = dir.join(format!("data-{n}.pem"));
    std::fs::write(&data, content).unwrap();
    let link = dir.join(format!("link-{n}"));
    std::os::unix::fs::symlink(&data, &link).unwrap();
    std::fs::rename(&link, path).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rewritten_anchors_file_replaces_the_bundle_and_renews_when_the_leaf_is_left_out() {
    let poll = Duration::from_secs(5);
    let r = rig_with_anchors(Some(poll));
    let anchors = r.identity.config.trust_anchors.clone().unwrap();
    let old = &r.ca.authority;
    let next = Arc::new(Authority::new("next"));
    let (stop, stopped) = watch::channel(false);
    let rotation = tokio::spawn(run_rotation(r.identity.clone(), stopped.clone()));
    let poller = tokio::spawn(watch_anchors(anchors.clone(), r.identity.clone(), stopped));
    tokio::time::sleep(ms(10)).await;
    assert_eq!(r.ca.requests(), 1);

    // The CA has moved to the next root, missed by this proxy: it signs from there.
    let clock = r.identity.clock.clone();
    let ca_next = next.clone();
    r.ca.set_default(Answer::Custom(Box::new(move |csr| CertificateResponse {
        spiffe_id: ME.into(),
        certificate_chain: vec![
            ca_next.sign_csr(csr, clock.now(), Duration::from_secs(3600), None),
            ca_next.intermediate.pem(),
        ],
        trust_bundle: vec![ca_next.root_pem()],
        expires_at: String::new(),
    })));

    // Unusable content is ignored.
    kubelet_write(r.dir.path(), &anchors.path, "not a certificate");
    tokio::time::sleep(poll + ms(500)).await;
    assert_eq!(*r.identity.bundle.ders(), vec![old.root_der()]);

    // Both roots: adopted; the leaf still chains, so no renewal.
    kubelet_write(
        r.dir.path(),
        &anchors.path,
        &format!("{}{}", old.root_pem(), next.root_pem()),
    );
    tokio::time::sleep(poll).await;
    assert_eq!(
        *r.identity.bundle.ders(),
        vec![old.root_der(), next.root_der()]
    );
    assert_eq!(r.ca.requests(), 1);

    // The next root alone: adopted as it is, and the leaf of the old root is renewed at once.
    kubelet_write(r.dir.path(), &anchors.path, &next.root_pem());
    tokio::time::sleep(poll).await;
    assert_eq!(r.ca.requests(), 2);
    assert_eq!(*r.identity.bundle.ders(), vec![next.root_der()]);
    let leaf = r.identity.store.valid().unwrap();
    assert_eq!(
        leaf.issuer.as_deref(),
        Some(sha256_fingerprint(next.intermediate.der()).as_str())
    );
    assert!(r.identity.store.leaf_chains_to(&[next.root_der()]));

    stop.send(true).unwrap();
    rotation.await.unwrap();
    poller.await.unwrap();
}

/// A bundle offered over a watch opened before the roots changed (the anchors file replaced
/// them: the old root may be compromised) is never judged against the new roots: it could
/// keep the new root and smuggle in another.
#[tokio::test(start_paused = true)]
async fn an_offer_from_a_watch_older_than_the_roots_is_ignored() {
    let r = rig();
    r.identity.renew_once().await.unwrap();
    let view = MeshView::new(MeshConfig {
        pod_ip: Some("10.77.0.2".parse().unwrap()),
        ..MeshConfig::default()
    })
    .with_credentials(Credentials {
        store: r.identity.store.clone(),
        bundle: r.identity.bundle.clone(),
        early: r.identity.early.clone(),
    });
    let (recovered, evil) = (Authority::new("recovered"), Authority::new("evil"));
    let opened_at = r.identity.bundle.generation();
    // The anchors file brings the recovered root while the old watch is still open.
    r.identity
        .bundle
        .replace(vec![recovered.root_der()])
        .unwrap();
    let message = palisade_ca_api::wire::WatchMessage {
        kind: palisade_ca_api::wire::WatchMessageKind::Update,
        version: 2,
        inbound: None,
        destinations: vec![],
        trust_bundle: vec![recovered.root_pem(), evil.root_pem()],
        renew: None,
    };
    view.apply_from(&message, opened_at);
    assert_eq!(*r.identity.bundle.ders(), vec![recovered.root_der()]);
    // The same offer over a watch opened after the change is judged as usual.
    view.apply_from(&message, r.identity.bundle.generation());
    assert_eq!(
        *r.identity.bundle.ders(),
        vec![recovered.root_der(), evil.root_der()]
    );
}

/// A renewal answer whose bundle holds an unusable root still installs the leaf (it chains to
/// the root held now) and keeps the current bundle, instead of failing every retry until the
/// leaf expires.
#[tokio::test(start_paused = true)]
async fn a_bundle_with_an_unusable_root_keeps_the_current_one_and_the_leaf_is_installed() {
    let r = rig();
    let next = Authority::new("next");
    r.ca.extra_roots.lock().unwrap().extend([
        next.root_pem(),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
    ]);
    r.identity
        .renew_once()
        .await
        .expect("the leaf chains to the root held now");
    assert_eq!(*r.identity.bundle.ders(), vec![r.ca.authority.root_der()]);
}
