//! A whole CA in Kubernetes mode (`--source kube --auth kube`) against the scripted API server:
//! keys from a new Secret (never on disk), readiness only after every watch has synced, the
//! unmeshed-pod scan of a namespace that opts in.

mod kube_support;
mod support;

use std::net::SocketAddr;

use base64::Engine;
use http::{Method, StatusCode};
use kube_support::{GUARD, Reply, Router, fixture, mock_client};
use palisade_ca::config::{AuthMode, MeshSource, ServeConfig};
use palisade_ca::keys::{KeySource, ROOT_CERT_FILE, ROOT_KEY_FILE};
use palisade_ca::server::start_with_kube_client;
use palisade_ca_api::cert::cert_to_pem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const SECRET: &str = "/api/v1/namespaces/palisade-system/secrets/palisade-ca-keys";

async fn ready_status(admin: SocketAddr) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    answer[9..12].parse().unwrap()
}

/// A cluster's API: the lists every kube-mode CA makes (MeshPolicies answered when `policies`
/// is sent), and no Secret yet.
fn cluster() -> (
    Router,
    oneshot::Sender<http::Response<kube_support::MockBody>>,
) {
    let router = Router::default();
    router.script(
        Method::GET,
        SECRET,
        false,
        Reply::Json(StatusCode::NOT_FOUND, fixture("secret-notfound-404.json")),
    );
    router.script(
        Method::POST,
        "/api/v1/namespaces/palisade-system/secrets",
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    router.list("/api/v1/pods", fixture("pod-list.json"));
    router.list("/api/v1/namespaces", fixture("namespace-list.json"));
    router.list("/api/v1/services", fixture("service-list.json"));
    router.list(
        "/apis/discovery.k8s.io/v1/endpointslices",
        fixture("endpointslice-list.json"),
    );
    let (policies_listed, policy_list) = oneshot::channel();
    router.script(
        Method::GET,
        "/apis/palisade.dev/v1alpha1/meshpolicies",
        false,
        Reply::Deferred(policy_list),
    );
    (router, policies_listed)
}

/// A kube-mode configuration whose --state-dir cannot even be created (it lies under a regular
/// file): Kubernetes mode keeps keys in the Secret and in memory, never on disk.
fn kube_config(dir: &tempfile::TempDir) -> ServeConfig {
    std::fs::write(dir.path().join("file"), "").unwrap();
    let state_dir = dir.path().join("file").join("state");
    let mut config = ServeConfig::embedded(state_dir, Default::default());
    config.source = MeshSource::Kube;
    config.auth = AuthMode::Kube;
    config
}

#[tokio::test]
async fn kube_mode_starts_from_the_secret_and_is_ready_after_the_first_sync() {
    palisade_ca_api::tls::install_default_provider();
    let (client, handle) = mock_client("palisade-system");
    let (router, policies_listed) = cluster();
    router.serve(handle);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let state_dir = dir.path().join("file").join("state");
    let mut config = ServeConfig::embedded(state_dir, Default::default());
    config.source = MeshSource::Kube;
    config.auth = AuthMode::Kube;
    let running = tokio::time::timeout(GUARD, start_with_kube_client(config, Some(client)))
        .await
        .expect("start-up in time")
        .expect("the CA starts in kube mode");
    assert_eq!(running.ca.authenticator.name(), "kube");

    let created = router
        .wait_for("Secret create", |s| s.method == Method::POST)
        .await;
    let root = created.body.unwrap()["data"]["root.pem"]
        .as_str()
        .unwrap()
        .to_owned();
    let root = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(root)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        root,
        cert_to_pem(&running.ca.rotation.authority().roots()[0]),
        "signs under the stored root"
    );

    router
        .wait_for("meshpolicy list", |s| s.path.ends_with("/meshpolicies"))
        .await;
    assert_eq!(
        ready_status(running.admin_addr).await,
        503,
        "not ready before every watch synced"
    );

    policies_listed
        .send(kube_support::json_response(
            StatusCode::OK,
            &fixture("meshpolicy-list-empty.json"),
        ))
        .unwrap();
    let mut ready = running.ca.ready.clone();
    tokio::time::timeout(GUARD, ready.wait_for(|r| *r))
        .await
        .expect("ready after the sync")
        .unwrap();
    assert_eq!(ready_status(running.admin_addr).await, 200);
    let snap = running.ca.publisher.current();
    assert!(
        snap.state
            .workload_at("10.244.1.7".parse().unwrap())
            .is_some()
    );
    running.shutdown().await;
}

#[tokio::test]
async fn an_operators_root_in_kube_mode_signs_through_an_intermediate_held_in_memory() {
    palisade_ca_api::tls::install_default_provider();
    let (client, handle) = mock_client("palisade-system");
    let (router, _policies) = cluster();
    router.serve(handle);

    let dir = tempfile::tempdir().unwrap();
    let operator = dir.path().join("operator");
    let made = palisade_ca::keys::load_or_create(
        &operator,
        &KeySource::Generated,
        "cluster.local",
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let mut config = kube_config(&dir);
    config.keys = KeySource::ExternalRoot {
        cert: operator.join(ROOT_CERT_FILE),
        key: operator.join(ROOT_KEY_FILE),
    };
    let running = tokio::time::timeout(GUARD, start_with_kube_client(config, Some(client)))
        .await
        .expect("start-up in time")
        .expect("an operator's root needs no writable --state-dir in kube mode");
    assert_eq!(running.ca.rotation.authority().roots(), made.roots);
    assert_ne!(
        running.ca.rotation.authority().chain_tail_der()[0],
        made.intermediates[0],
        "a fresh intermediate, made in memory"
    );
    assert!(
        router.log().iter().all(|s| !s.path.contains("/secrets")),
        "an operator's CA uses no Secret of the CA's"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn kube_mode_scans_a_namespace_that_opts_in_for_unmeshed_pods() {
    palisade_ca_api::tls::install_default_provider();
    let (client, handle) = mock_client("palisade-system");
    let (router, policies_listed) = cluster();
    let namespaces = router.watch("/api/v1/namespaces");
    // The trust anchors of `shop` are answered: this test is about the scan.
    router.script(
        Method::GET,
        "/api/v1/namespaces/shop/configmaps/palisade-trust-anchors",
        false,
        Reply::Json(
            StatusCode::NOT_FOUND,
            fixture("configmap-notfound-404.json"),
        ),
    );
    router.script(
        Method::POST,
        "/api/v1/namespaces/shop/configmaps",
        false,
        Reply::Echo(StatusCode::CREATED),
    );
    router.serve(handle);
    let dir = tempfile::tempdir().unwrap();
    let running = tokio::time::timeout(
        GUARD,
        start_with_kube_client(kube_config(&dir), Some(client)),
    )
    .await
    .expect("start-up in time")
    .expect("the CA starts in kube mode");
    router
        .wait_for("meshpolicy list", |s| s.path.ends_with("/meshpolicies"))
        .await;
    policies_listed
        .send(kube_support::json_response(
            StatusCode::OK,
            &fixture("meshpolicy-list-empty.json"),
        ))
        .unwrap();

    namespaces
        .send(fixture("namespace-shop-opted-in-event.json"))
        .unwrap();
    let scan = router
        .wait_for("the unmeshed-pod list of shop", |s| {
            s.method == Method::GET && s.path == "/api/v1/namespaces/shop/pods"
        })
        .await;
    assert_eq!(
        scan.query.get("labelSelector").map(String::as_str),
        Some("!palisade.dev/injected")
    );
    // Its answer is held open: shutdown does not wait for it.
    tokio::time::timeout(GUARD, running.shutdown())
        .await
        .expect("shutdown in time");
}
