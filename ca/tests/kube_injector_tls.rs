//! The injector's serving certificate and the webhook's caBundle, kept by the CA through the
//! Kubernetes API (recorded answers): issued into the Secret when absent, re-issued when the
//! issuing intermediate changes, never rewritten when current; the caBundle follows the trust
//! bundle through a root rotation and keeps the retired root for a grace period; another
//! webhook of the same configuration is left alone.

mod kube_support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use kube_support::{Scenario, Seen, fixture, json_response, mock_client, receive};
use palisade_ca::keys::DirStore;
use palisade_ca::kube::injector_tls::{InjectorTls, maintain};
use palisade_ca::mesh::MeshState;
use palisade_ca::metrics::Metrics;
use palisade_ca::rotation::{Kind, Rotation, Settings, Trigger};
use palisade_ca_api::cert::sha256_fingerprint;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use time::OffsetDateTime;

const SECRET: &str = "/api/v1/namespaces/palisade-system/secrets/palisade-injector-tls";
const SECRETS: &str = "/api/v1/namespaces/palisade-system/secrets";
const WEBHOOK: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/palisade-injector";
const GRACE: Duration = Duration::from_secs(2);

fn b64(value: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("base64 string"))
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

struct World {
    api: Scenario,
    rotation: Arc<Rotation>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

fn start() -> World {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let settings = Settings {
        settle: time::Duration::ZERO,
        reconnect_grace: time::Duration::ZERO,
        max_leaf_lifetime: time::Duration::seconds(1),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new(0));
    let rotation = Arc::new(
        Rotation::open(
            Box::new(DirStore(dir.path().to_path_buf())),
            "cluster.local",
            settings,
            Vec::new(),
            metrics.clone(),
            now,
        )
        .unwrap(),
    );
    let (client, handle) = mock_client("palisade-system");
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(maintain(
        InjectorTls {
            client,
            namespace: "palisade-system".into(),
            trust_domain: "cluster.local".into(),
            rotation: rotation.clone(),
            metrics: metrics.clone(),
            // Passes come from changes in these tests, never from the clock.
            check_every: Duration::from_secs(3600),
            retired_root_grace: GRACE,
        },
        shutdown_rx,
    ));
    World {
        api: Scenario { handle },
        rotation,
        metrics,
        _dir: dir,
        _shutdown: shutdown,
    }
}

impl World {
    /// Answers the next request, which must be `method path`, with its own body (as the API
    /// server answers a create or an update) and a new resourceVersion.
    async fn echo(&mut self, method: Method, path: &str) -> Seen {
        let (seen, send) = receive(&mut self.api.handle).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "{seen:?}"
        );
        let mut body = seen.body.clone().expect("a body");
        body["metadata"]["resourceVersion"] = "90001".into();
        send.send_response(json_response(StatusCode::OK, &body));
        seen
    }

    async fn get(&mut self, path: &str, reply: Value) {
        self.api
            .expect(Method::GET, path, StatusCode::OK, reply)
            .await;
    }

    fn bundle(&self) -> String {
        self.rotation.authority().trust_bundle_pem().concat()
    }

    fn issuing_intermediate(&self) -> String {
        sha256_fingerprint(&self.rotation.authority().chain_tail_der()[0])
    }
}

/// The Secret a create or update carried, and the chain in it.
fn chain_of(secret: &Value) -> Vec<CertificateDer<'static>> {
    certs(&b64(&secret["data"]["tls.crt"]))
}

#[tokio::test]
async fn the_certificate_is_issued_kept_and_reissued_when_the_intermediate_changes() {
    let mut w = start();
    // First pass: no Secret yet, the webhook without a caBundle.
    w.api
        .expect(
            Method::GET,
            SECRET,
            StatusCode::NOT_FOUND,
            fixture("secret-injector-tls-notfound-404.json"),
        )
        .await;
    let created = w.echo(Method::POST, SECRETS).await.body.unwrap();
    assert_eq!(created["type"], "kubernetes.io/tls");
    assert_eq!(created["metadata"]["name"], "palisade-injector-tls");
    assert_eq!(
        created["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "palisade-ca"
    );
    let chain = chain_of(&created);
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    assert_eq!(sha256_fingerprint(&chain[1]), w.issuing_intermediate());
    assert!(b64(&created["data"]["tls.key"]).contains("BEGIN PRIVATE KEY"));
    assert_eq!(b64(&created["data"]["ca.crt"]), w.bundle());
    w.get(WEBHOOK, fixture("mutatingwebhookconfiguration.json"))
        .await;
    let updated = w.echo(Method::PUT, WEBHOOK).await.body.unwrap();
    assert_eq!(
        b64(&updated["webhooks"][0]["clientConfig"]["caBundle"]),
        w.bundle()
    );
    assert_eq!(
        updated["webhooks"][1]["clientConfig"]["caBundle"], "T1RIRVI=",
        "another webhook of the configuration is left alone"
    );
    assert_eq!(
        updated["metadata"]["resourceVersion"], "48211",
        "on top of what was read"
    );
    let rendered = w.metrics.render(0);
    assert!(
        rendered.contains("palisade_ca_injector_cert_expiry_timestamp_seconds "),
        "{rendered}"
    );

    // An intermediate rotation: the Secret read back holds the old intermediate's
    // certificate, so it is re-issued, on top of the version read; the caBundle (same root)
    // is not rewritten.
    let mut stored = created.clone();
    stored["metadata"]["resourceVersion"] = "90001".into();
    w.rotation
        .begin(
            Kind::Intermediate,
            Trigger::Manual,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    w.get(SECRET, stored.clone()).await;
    let reissued = w.echo(Method::PUT, SECRET).await.body.unwrap();
    assert_eq!(reissued["metadata"]["resourceVersion"], "90001");
    let chain = chain_of(&reissued);
    assert_eq!(sha256_fingerprint(&chain[1]), w.issuing_intermediate());
    assert_ne!(chain_of(&reissued)[0], chain_of(&created)[0]);
    assert_ne!(
        reissued["data"]["tls.key"], created["data"]["tls.key"],
        "a fresh key"
    );
    w.get(WEBHOOK, updated.clone()).await;
    w.api.expect_no_more().await;
}

#[tokio::test]
async fn the_ca_bundle_follows_a_root_rotation_and_keeps_the_retired_root_for_a_while() {
    let mut w = start();
    let old_bundle = w.bundle();
    // Start from a current Secret and webhook.
    w.api
        .expect(
            Method::GET,
            SECRET,
            StatusCode::NOT_FOUND,
            fixture("secret-injector-tls-notfound-404.json"),
        )
        .await;
    let mut secret = w.echo(Method::POST, SECRETS).await.body.unwrap();
    w.get(WEBHOOK, fixture("mutatingwebhookconfiguration.json"))
        .await;
    let mut webhook = w.echo(Method::PUT, WEBHOOK).await.body.unwrap();

    // trusting: both roots in the bundle, the certificate (old intermediate) still current.
    w.rotation
        .begin(Kind::Root, Trigger::Manual, OffsetDateTime::now_utc())
        .unwrap();
    let both = w.bundle();
    assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);
    w.get(SECRET, secret.clone()).await;
    w.get(WEBHOOK, webhook.clone()).await;
    webhook = w.echo(Method::PUT, WEBHOOK).await.body.unwrap();
    assert_eq!(
        b64(&webhook["webhooks"][0]["clientConfig"]["caBundle"]),
        both
    );

    // issuing: the new intermediate signs; the certificate is re-issued under it.
    let now = OffsetDateTime::now_utc();
    w.rotation.step(&MeshState::default(), now).unwrap();
    assert_eq!(w.rotation.status().phase, "issuing");
    w.get(SECRET, secret.clone()).await;
    secret = w.echo(Method::PUT, SECRET).await.body.unwrap();
    assert_eq!(
        sha256_fingerprint(&chain_of(&secret)[1]),
        w.issuing_intermediate()
    );
    w.get(WEBHOOK, webhook.clone()).await;

    // retiring, then idle: the old root leaves the bundle, but stays in the caBundle until
    // the grace has passed (the kubelet may not have brought the new certificate yet).
    let mut phase = w.rotation.status().phase;
    for _ in 0..4 {
        if phase == "idle" {
            break;
        }
        let later = OffsetDateTime::now_utc() + time::Duration::seconds(120);
        w.rotation.step(&MeshState::default(), later).unwrap();
        phase = w.rotation.status().phase;
    }
    assert_eq!(phase, "idle");
    let new_bundle = w.bundle();
    assert_eq!(new_bundle.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(!old_bundle.contains(&new_bundle));
    w.get(SECRET, secret.clone()).await;
    w.get(WEBHOOK, webhook.clone()).await;
    // Nothing written: the caBundle already holds the new root and still the old one (the
    // order does not matter).
    let started = tokio::time::Instant::now();
    w.get(SECRET, secret.clone()).await;
    assert!(
        started.elapsed() >= GRACE / 2,
        "the next pass came when the grace ended, not at once"
    );
    w.get(WEBHOOK, webhook.clone()).await;
    let last = w.echo(Method::PUT, WEBHOOK).await.body.unwrap();
    assert_eq!(
        b64(&last["webhooks"][0]["clientConfig"]["caBundle"]),
        new_bundle,
        "the retired root left the caBundle after the grace"
    );
}
