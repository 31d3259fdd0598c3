//! The watches on Pods, Namespaces and MeshPolicies feed the mesh watch stream a proxy reads;
//! a 410 Gone relists without dropping the last good state; an opted-in namespace gets its
//! trust-anchor ConfigMap.

mod kube_support;

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use http::{Method, StatusCode};
use kube_support::{GUARD, Reply, Router, fixture, mock_client};
use palisade_ca::kube::{WatchOutputs, WatchSettings, spawn_watches};
use palisade_ca::mesh::watch::watch_stream;
use palisade_ca::mesh::{MeshPublisher, MeshState};
use palisade_ca::metrics::Metrics;
use palisade_ca_api::policy::{DefaultPolicy, PolicyMode};
use palisade_ca_api::wire::{WatchMessage, WatchQuery};
use tokio::sync::{mpsc, oneshot, watch};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/palisade.dev/v1alpha1/meshpolicies";
const API_POD_IP: &str = "10.244.1.7";

struct Cluster {
    router: Router,
    publisher: MeshPublisher,
    metrics: Arc<Metrics>,
    outputs: WatchOutputs,
    pods: mpsc::UnboundedSender<serde_json::Value>,
    namespaces: mpsc::UnboundedSender<serde_json::Value>,
    policies: mpsc::UnboundedSender<serde_json::Value>,
    client: kube::Client,
    shutdown: watch::Sender<bool>,
    _tasks: tokio::task::JoinSet<()>,
}

/// A virtual-clock wait (the tests run on tokio's paused clock): long enough for any debounced
/// publication to have happened.
async fn let_debounce_pass() {
    tokio::time::sleep(palisade_ca::kube::DEBOUNCE * 10).await;
}

fn start_cluster() -> Cluster {
    let router = Router::default();
    router.list(POLICIES, fixture("meshpolicy-list-empty.json"));
    start_cluster_with(router)
}

/// Pods and namespaces listed; the MeshPolicy list as `router` scripts it.
fn start_cluster_with(router: Router) -> Cluster {
    let (client, handle) = mock_client("palisade-system");
    router.list(PODS, fixture("pod-list.json"));
    let pods = router.watch(PODS);
    router.list(NAMESPACES, fixture("namespace-list.json"));
    let namespaces = router.watch(NAMESPACES);
    let policies = router.watch(POLICIES);
    router.serve(handle);
    let publisher = MeshPublisher::new(MeshState::new(
        "cluster.local".into(),
        DefaultPolicy::AllAuthenticated,
        Default::default(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    ));
    let metrics = Arc::new(Metrics::new(0));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let outputs = spawn_watches(
        client.clone(),
        WatchSettings {
            trust_domain: "cluster.local".into(),
            default_policy: DefaultPolicy::AllAuthenticated,
        },
        publisher.clone(),
        metrics.clone(),
        shutdown_rx,
        &mut tasks,
    );
    Cluster {
        router,
        publisher,
        metrics,
        outputs,
        pods,
        namespaces,
        policies,
        client,
        shutdown,
        _tasks: tasks,
    }
}

async fn until_ready(cluster: &mut Cluster) {
    tokio::time::timeout(GUARD, cluster.outputs.ready.wait_for(|r| *r))
        .await
        .expect("the watches sync")
        .unwrap();
}

async fn next_message(
    stream: &mut (impl futures_util::Stream<Item = bytes::Bytes> + Unpin),
) -> WatchMessage {
    let line = tokio::time::timeout(GUARD, stream.next())
        .await
        .expect("a watch message in time")
        .expect("the stream stays open");
    serde_json::from_slice(&line).unwrap()
}

#[tokio::test(start_paused = true)]
async fn watches_list_the_meshed_pods_only_and_become_ready() {
    let mut cluster = start_cluster();
    assert!(
        !*cluster.outputs.ready.borrow(),
        "not ready before the first sync"
    );
    until_ready(&mut cluster).await;
    let pod_list = cluster
        .router
        .wait_for("pod list", |s| s.path == PODS && !s.is_watch())
        .await;
    assert_eq!(pod_list.method, Method::GET);
    assert_eq!(
        pod_list.query.get("labelSelector").map(String::as_str),
        Some("palisade.dev/injected=true"),
        "only meshed pods are listed"
    );
    let pod_watch = cluster
        .router
        .wait_for("pod watch", |s| s.path == PODS && s.is_watch())
        .await;
    assert_eq!(
        pod_watch.query.get("resourceVersion").map(String::as_str),
        Some("50101"),
        "the watch resumes from the list"
    );
    let snap = cluster.publisher.current();
    let ip: IpAddr = API_POD_IP.parse().unwrap();
    let w = snap.state.workload_at(ip).expect("the pod is a workload");
    assert_eq!(
        (
            w.name.as_str(),
            w.namespace.as_str(),
            w.service_account.as_str()
        ),
        ("api-5c7d8f9b6-qw4rt", "shop", "api")
    );
    assert_eq!(
        snap.state.inbound_policy(w).default_policy,
        DefaultPolicy::Deny,
        "the namespace annotation applies"
    );
    let _ = cluster.shutdown.send(true);
}

#[tokio::test(start_paused = true)]
async fn not_ready_and_nothing_published_until_every_watch_has_listed() {
    let router = Router::default();
    let (release, policy_list) = oneshot::channel();
    router.script(Method::GET, POLICIES, false, Reply::Deferred(policy_list));
    let mut cluster = start_cluster_with(router);
    cluster
        .router
        .wait_until("pods and namespaces listed, policies asked", |log| {
            let watching = |p: &str| log.iter().any(|s| s.path == p && s.is_watch());
            watching(PODS) && watching(NAMESPACES) && log.iter().any(|s| s.path == POLICIES)
        })
        .await;
    let_debounce_pass().await;
    assert!(
        !*cluster.outputs.ready.borrow(),
        "ready before the MeshPolicy list"
    );
    assert_eq!(
        cluster.publisher.current().version,
        1,
        "a partial state was published"
    );

    release
        .send(kube_support::json_response(
            StatusCode::OK,
            &fixture("meshpolicy-list-empty.json"),
        ))
        .unwrap();
    until_ready(&mut cluster).await;
    assert!(cluster.publisher.current().version > 1);
    let _ = cluster.shutdown.send(true);
}

#[tokio::test(start_paused = true)]
async fn a_policy_added_changed_and_deleted_reaches_the_proxy_watch() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let (_stop, stop_rx) = watch::channel(false);
    let query = WatchQuery {
        pod_ip: Some(API_POD_IP.parse().unwrap()),
        destinations: vec![API_POD_IP.parse().unwrap()],
    };
    let mut stream = Box::pin(watch_stream(cluster.publisher.subscribe(), query, stop_rx));
    let first = next_message(&mut stream).await;
    let inbound = first.inbound.expect("the proxy's own workload is known");
    assert!(inbound.policies.is_empty());
    assert_eq!(
        first.destinations[0]
            .spiffe_id
            .as_ref()
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );

    let sent = tokio::time::Instant::now();
    cluster
        .policies
        .send(fixture("meshpolicy-added-event.json"))
        .unwrap();
    let added = next_message(&mut stream).await.inbound.unwrap();
    // On the paused clock: the debounce is the only wait between an event and the proxy.
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(1),
        "a change reaches the proxy within one second"
    );
    assert_eq!(added.policies.len(), 1);
    assert_eq!(added.policies[0].name, "shop/api-from-web");
    assert_eq!(added.policies[0].ports, vec![8080]);
    assert_eq!(added.policies[0].mode, PolicyMode::Enforce);

    cluster
        .policies
        .send(fixture("meshpolicy-modified-event.json"))
        .unwrap();
    let changed = next_message(&mut stream).await.inbound.unwrap();
    assert_eq!(changed.policies[0].ports, vec![8080, 9090]);
    assert_eq!(changed.policies[0].mode, PolicyMode::Audit);
    assert_eq!(changed.policies[0].allow.len(), 2);

    cluster
        .policies
        .send(fixture("meshpolicy-deleted-event.json"))
        .unwrap();
    let deleted = next_message(&mut stream).await.inbound.unwrap();
    assert!(deleted.policies.is_empty());
    let _ = cluster.shutdown.send(true);
}

#[tokio::test(start_paused = true)]
async fn gone_410_relists_and_keeps_the_last_good_state_meanwhile() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let old_ip: IpAddr = API_POD_IP.parse().unwrap();
    let (release, relist) = oneshot::channel();
    cluster
        .router
        .script(Method::GET, PODS, false, Reply::Deferred(relist));
    let version_before = cluster.publisher.current().version;

    cluster
        .pods
        .send(fixture("watch-gone-410-event.json"))
        .unwrap();
    cluster
        .router
        .wait_until("a relist after 410", |log| {
            log.iter()
                .filter(|s| s.path == PODS && !s.is_watch())
                .count()
                == 2
        })
        .await;
    // The relist is in flight: the proxy still sees the pod it knew.
    let_debounce_pass().await;
    let snap = cluster.publisher.current();
    assert!(
        snap.state.workload_at(old_ip).is_some(),
        "state kept during the relist"
    );
    assert_eq!(
        snap.version, version_before,
        "nothing was published from an error"
    );
    assert!(
        cluster
            .metrics
            .render(0)
            .contains("palisade_ca_kube_watch_errors_total{kind=\"pods\"} 1")
    );

    release
        .send(kube_support::json_response(
            StatusCode::OK,
            &fixture("pod-list-after-relist.json"),
        ))
        .unwrap();
    let mut rx = cluster.publisher.subscribe();
    let new_ip: IpAddr = "10.244.2.9".parse().unwrap();
    tokio::time::timeout(
        GUARD,
        rx.wait_for(|s| s.state.workload_at(new_ip).is_some()),
    )
    .await
    .expect("the relisted state is published")
    .unwrap();
    let snap = cluster.publisher.current();
    assert!(
        snap.state.workload_at(old_ip).is_none(),
        "the relist replaced the list"
    );
    cluster
        .router
        .wait_for("the watch restarted from the relist", |s| {
            s.path == PODS
                && s.is_watch()
                && s.query.get("resourceVersion").map(String::as_str) == Some("50377")
        })
        .await;
    let _ = cluster.shutdown.send(true);
}

#[tokio::test(start_paused = true)]
async fn a_namespace_opting_in_gets_its_trust_anchor_configmap() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let cm = "/api/v1/namespaces/shop/configmaps/palisade-trust-anchors";
    let cms = "/api/v1/namespaces/shop/configmaps";
    cluster.router.script(
        Method::GET,
        cm,
        false,
        Reply::Json(
            StatusCode::NOT_FOUND,
            fixture("configmap-notfound-404.json"),
        ),
    );
    let (created_tx, created_rx) = oneshot::channel();
    cluster
        .router
        .script(Method::POST, cms, false, Reply::Deferred(created_rx));
    let bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_owned();
    let (_stop, stop_rx) = watch::channel(false);
    let distributor = tokio::spawn(palisade_ca::kube::anchors::distribute(
        cluster.client.clone(),
        bundle.clone(),
        cluster.outputs.opted_in.clone(),
        stop_rx,
    ));
    // Nobody is opted in yet: no ConfigMap call.
    assert!(
        cluster
            .router
            .log()
            .iter()
            .all(|s| !s.path.contains("configmaps"))
    );

    cluster
        .namespaces
        .send(fixture("namespace-shop-opted-in-event.json"))
        .unwrap();
    let post = cluster
        .router
        .wait_for("ConfigMap create", |s| {
            s.method == Method::POST && s.path == cms
        })
        .await;
    let body = post.body.unwrap();
    created_tx
        .send(kube_support::json_response(StatusCode::CREATED, &body))
        .unwrap();
    assert_eq!(body["metadata"]["name"], "palisade-trust-anchors");
    assert_eq!(body["metadata"]["namespace"], "shop");
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "palisade-ca"
    );
    assert_eq!(body["data"]["ca.pem"], bundle.as_str());
    let get = cluster
        .router
        .log()
        .into_iter()
        .position(|s| s.method == Method::GET && s.path == cm);
    let create = cluster
        .router
        .log()
        .into_iter()
        .position(|s| s.method == Method::POST && s.path == cms);
    assert!(
        get < create,
        "read before create, so nothing is overwritten blindly"
    );
    distributor.abort();
    let _ = cluster.shutdown.send(true);
}
