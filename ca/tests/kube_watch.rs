//! The watches on Pods, Namespaces, MeshPolicies, Services and EndpointSlices feed the mesh
//! watch stream a proxy reads; a 410 Gone relists without dropping the last good state; an
//! opted-in namespace gets its trust-anchor ConfigMap.

mod kube_support;

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use http::{Method, StatusCode};
use kube_support::{GUARD, Reply, Router, fixture, mock_client};
use palisade_ca::kube::{WatchOutputs, WatchSettings, spawn_watches};
use palisade_ca::mesh::watch::watch_stream;
use palisade_ca::mesh::{MeshPublisher, MeshState, Snapshot};
use palisade_ca::metrics::Metrics;
use palisade_ca_api::policy::{DefaultPolicy, PolicyMode};
use palisade_ca_api::wire::{ServiceAnswer, WatchMessage, WatchQuery};
use tokio::sync::{mpsc, oneshot, watch};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/palisade.dev/v1alpha1/meshpolicies";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// Every watched kind and its recorded list.
const LISTS: [(&str, &str); 5] = [
    (PODS, "pod-list.json"),
    (NAMESPACES, "namespace-list.json"),
    (POLICIES, "meshpolicy-list-empty.json"),
    (SERVICES, "service-list.json"),
    (SLICES, "endpointslice-list.json"),
];
const API_POD_IP: &str = "10.244.1.7";

struct Cluster {
    router: Router,
    publisher: MeshPublisher,
    metrics: Arc<Metrics>,
    outputs: WatchOutputs,
    pods: mpsc::UnboundedSender<serde_json::Value>,
    namespaces: mpsc::UnboundedSender<serde_json::Value>,
    policies: mpsc::UnboundedSender<serde_json::Value>,
    /// Kept open: the Service watch stays quiet.
    _services: mpsc::UnboundedSender<serde_json::Value>,
    slices: mpsc::UnboundedSender<serde_json::Value>,
    pod_deletions: Arc<palisade_ca::auth::kube::PodDeletions>,
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
    start_cluster_with(Router::default(), None)
}

/// Every kind listed from its recording, except `unlisted`, whose list is as `router` scripts it.
fn start_cluster_with(router: Router, unlisted: Option<&str>) -> Cluster {
    let (client, handle) = mock_client("palisade-system");
    for (path, recording) in LISTS {
        if Some(path) != unlisted {
            router.list(path, fixture(recording));
        }
    }
    let pods = router.watch(PODS);
    let namespaces = router.watch(NAMESPACES);
    let policies = router.watch(POLICIES);
    let services = router.watch(SERVICES);
    let slices = router.watch(SLICES);
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
    let pod_deletions = Arc::new(palisade_ca::auth::kube::PodDeletions::default());
    let outputs = spawn_watches(
        client.clone(),
        WatchSettings {
            pod_deletions: Some(pod_deletions.clone()),
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
        _services: services,
        slices,
        pod_deletions,
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
    for (last, recording) in [
        (POLICIES, "meshpolicy-list-empty.json"),
        (SERVICES, "service-list.json"),
        (SLICES, "endpointslice-list.json"),
    ] {
        let router = Router::default();
        let (release, list) = oneshot::channel();
        router.script(Method::GET, last, false, Reply::Deferred(list));
        let mut cluster = start_cluster_with(router, Some(last));
        cluster
            .router
            .wait_until(
                "the others listed and watching, the last one asked",
                |log| {
                    let watching = |p: &str| log.iter().any(|s| s.path == p && s.is_watch());
                    LISTS
                        .iter()
                        .all(|(path, _)| *path == last || watching(path))
                        && log.iter().any(|s| s.path == last)
                },
            )
            .await;
        let_debounce_pass().await;
        assert!(
            !*cluster.outputs.ready.borrow(),
            "ready before the list of {last}"
        );
        assert_eq!(
            cluster.publisher.current().version,
            1,
            "a partial state was published before the list of {last}"
        );

        release
            .send(kube_support::json_response(
                StatusCode::OK,
                &fixture(recording),
            ))
            .unwrap();
        until_ready(&mut cluster).await;
        assert!(cluster.publisher.current().version > 1);
        let _ = cluster.shutdown.send(true);
    }
}

#[tokio::test(start_paused = true)]
async fn a_deleted_pod_is_reported_to_the_token_cache_and_leaves_the_mesh() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let uid = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
    assert!(!cluster.pod_deletions.contains(uid));
    let list: serde_json::Value = fixture("pod-list.json");
    let mut pod = list["items"][0].clone();
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    assert_eq!(pod["metadata"]["uid"], uid);
    cluster
        .pods
        .send(serde_json::json!({"type": "DELETED", "object": pod}))
        .unwrap();
    let gone = async {
        while !cluster.pod_deletions.contains(uid)
            || cluster
                .publisher
                .current()
                .state
                .workload_at(API_POD_IP.parse().unwrap())
                .is_some()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), gone)
        .await
        .expect("the deletion reaches the token cache and the mesh state");
    let _ = cluster.shutdown.send(true);
}

/// The identity of the recorded api pod, as its proxy's certificate says.
fn api_owner() -> palisade_ca::mesh::watch::Owner {
    palisade_ca::mesh::watch::Owner {
        namespace: "shop".into(),
        service_account: "api".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_added_changed_and_deleted_reaches_the_proxy_watch() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let (_stop, stop_rx) = watch::channel(false);
    let (_trust, trust_rx) = watch::channel(palisade_ca::rotation::TrustView::default());
    let query = WatchQuery {
        pod_ip: Some(API_POD_IP.parse().unwrap()),
        destinations: vec![API_POD_IP.parse().unwrap()],
        ..Default::default()
    };
    let mut stream = Box::pin(watch_stream(
        cluster.publisher.subscribe(),
        trust_rx,
        query,
        api_owner(),
        tokio::time::Instant::now() + std::time::Duration::from_secs(3600),
        stop_rx,
    ));
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

/// The answer the proxy of the `shop/api` pod gets for a Service address.
fn service_answer(snap: &Snapshot, address: &str) -> Option<ServiceAnswer> {
    snap.state
        .destination(address.parse().unwrap(), Some(API_POD_IP.parse().unwrap()))
        .service
}

fn endpoint_addresses(answer: &ServiceAnswer) -> Vec<String> {
    answer
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_service_address_is_answered_with_the_ready_endpoints_of_its_slices() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let slice_list = cluster
        .router
        .wait_for("EndpointSlice list", |s| s.path == SLICES && !s.is_watch())
        .await;
    assert_eq!(
        slice_list.query.get("labelSelector").map(String::as_str),
        Some("kubernetes.io/service-name"),
        "only the slices of Services are listed"
    );
    let snap = cluster.publisher.current();

    let api = service_answer(&snap, "10.96.0.10").expect("shop/api is answered");
    assert_eq!(api.name, "shop/api");
    assert_eq!(api.ports, vec![80, 9090]);
    assert_eq!(
        endpoint_addresses(&api),
        ["10.244.1.7", "10.244.1.8", "10.244.2.3"],
        "both slices of shop/api, without the not-ready 10.244.2.4"
    );
    assert_eq!(api.total_endpoints, 3);
    for e in &api.endpoints {
        assert_eq!(
            (e.target_port(80), e.target_port(9090)),
            (Some(8080), Some(9090)),
            "targetPort `http` arrives resolved in the slice's ports"
        );
    }
    assert!(
        api.endpoints[0].meshed,
        "10.244.1.7 is the injected api pod"
    );
    assert_eq!(
        api.endpoints[0].spiffe_id.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    assert!(!api.endpoints[1].meshed);

    let by_v4 = service_answer(&snap, "10.96.0.20").expect("shop/web at its IPv4 address");
    let by_v6 = service_answer(&snap, "fd00:10:96::20").expect("shop/web at its IPv6 address");
    assert_eq!(by_v4, by_v6, "either family answers the same Service");
    assert_eq!(by_v4.name, "shop/web");
    assert_eq!(
        endpoint_addresses(&by_v4),
        ["10.244.1.20", "fd00:10:244:1::20"],
        "the IPv4 and the IPv6 slice"
    );
    assert!(
        by_v4
            .endpoints
            .iter()
            .all(|e| e.target_port(80) == Some(8080))
    );

    let warmup = service_answer(&snap, "10.96.0.30").expect("shop/warmup");
    assert_eq!(
        endpoint_addresses(&warmup),
        ["10.244.3.5", "10.244.3.6"],
        "publishNotReadyAddresses: the not-ready endpoint too"
    );

    let legacy = service_answer(&snap, "10.96.0.40").expect("shop/legacy-db, without a selector");
    assert_eq!(endpoint_addresses(&legacy), ["192.168.10.5"]);
    assert_eq!(legacy.endpoints[0].target_port(5432), Some(5432));

    assert!(
        snap.state.services().iter().all(|s| s.name != "db"),
        "a headless Service has no address to answer"
    );
    let _ = cluster.shutdown.send(true);
}

#[tokio::test(start_paused = true)]
async fn a_slice_that_drops_an_endpoint_drops_it_from_the_proxy_watch() {
    let mut cluster = start_cluster();
    until_ready(&mut cluster).await;
    let (_stop, stop_rx) = watch::channel(false);
    let (_trust, trust_rx) = watch::channel(palisade_ca::rotation::TrustView::default());
    let query = WatchQuery {
        pod_ip: Some(API_POD_IP.parse().unwrap()),
        destinations: vec!["10.96.0.10".parse().unwrap()],
        ..Default::default()
    };
    let mut stream = Box::pin(watch_stream(
        cluster.publisher.subscribe(),
        trust_rx,
        query,
        api_owner(),
        tokio::time::Instant::now() + std::time::Duration::from_secs(3600),
        stop_rx,
    ));
    let first = next_message(&mut stream).await;
    let before = first.destinations[0].service.as_ref().unwrap();
    assert_eq!(
        endpoint_addresses(before),
        ["10.244.1.7", "10.244.1.8", "10.244.2.3"]
    );

    let sent = tokio::time::Instant::now();
    cluster
        .slices
        .send(fixture("endpointslice-modified-event.json"))
        .unwrap();
    let update = next_message(&mut stream).await;
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(1),
        "a change reaches the proxy within one second"
    );
    let after = update.destinations[0].service.as_ref().unwrap();
    assert_eq!(
        endpoint_addresses(after),
        ["10.244.1.7", "10.244.1.8"],
        "10.244.2.3 left slice api-m9q4d; the other slice is untouched"
    );
    assert_eq!(after.total_endpoints, 2);
    let snap = cluster.publisher.current();
    assert_eq!(
        service_answer(&snap, "10.96.0.10").unwrap(),
        *after,
        "the published state agrees"
    );
    let _ = cluster.shutdown.send(true);
}
