//! Kubernetes Services through the mesh, on a node shaped like a cluster's: pods routed by the
//! node (Calico's point-to-point links), kube-proxy's iptables DNAT for every ClusterIP on the
//! node, `palisade-ca` (file source) answering for Services, and meshed pods whose apps call
//! a ClusterIP. The client's proxy balances over the Service's ready endpoints itself and
//! connects to the chosen pod directly: mTLS to a meshed endpoint (its own identity checked),
//! plain TCP to an unmeshed one; the node's DNAT is not in the path of meshed traffic.
//!
//! Needs root (network namespaces, iptables) and the workspace's binaries (`cargo build
//! --workspace --bins`); each test prints why it is skipped when not root.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_testkit::capture::contains;
use palisade_testkit::mesh_file::{API_FROM_WEB, MeshFile, Service, TargetPort, Workload};
use palisade_testkit::netns;
use support::node::{self, APP_UID, NAMESPACE, Node, Pod};

const BODY: &str = "the mesh says hello";
/// The Service every meshed scenario calls: two replicas of `shop/api` serving on 8080.
const API_IP: &str = "10.96.0.10";
/// The same replicas through a named target port (`targetPort: http`).
const API_NAMED_IP: &str = "10.96.0.11";
/// A Service whose selector picks no pod.
const EMPTY_IP: &str = "10.96.0.12";
/// A Service whose endpoints have no proxy.
const LEGACY_IP: &str = "10.96.0.20";
/// A Service with one meshed and one unmeshed endpoint.
const MIXED_IP: &str = "10.96.0.21";
/// The port the Services listen on; the apps listen on [`APP_PORT`].
const SERVICE_PORT: u16 = 80;
const APP_PORT: u16 = 8080;
/// Where `api-2` of the shared node serves the port it names `http` (`api-1`: [`APP_PORT`]).
const API2_HTTP_PORT: u16 = 8081;

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}")
}

/// A routed node, or `None` (after printing why) where these tests cannot run.
fn node(test: &str, net: u8) -> Option<Node> {
    let tools: Vec<&str> = node::TOOLS
        .iter()
        .chain(node::ROUTED_TOOLS)
        .copied()
        .collect();
    if netns::skip(test, &tools) {
        return None;
    }
    let mut n = Node::routed(net);
    n.publish("hello.txt", BODY);
    // Allowed connections are logged with the caller's identity at debug level.
    n.set_proxy_log("info,palisade::policy=debug");
    Some(n)
}

/// `url` fetched by the app of `pod` (as the app uid, so a meshed pod's capture applies) on a
/// new connection: the body, or curl's error.
fn call(pod: &Pod, url: &str) -> Result<String, String> {
    netns::curl(
        &pod.netns,
        Some(APP_UID),
        &["-sS", "-f", "--max-time", "5", url],
    )
    .map(|b| b.trim().to_owned())
}

/// `n` calls of `url` from `pod`, each on a new connection: how many each replica answered
/// (by the `who` it serves), and the errors.
fn tally(pod: &Pod, url: &str, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut answered = BTreeMap::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        match call(pod, url) {
            Ok(who) => *answered.entry(who).or_insert(0) += 1,
            Err(e) => failed.push(e),
        }
    }
    (answered, failed)
}

fn who_url(ip: &str, port: u16, tag: &str) -> String {
    format!("http://{ip}:{port}/who?{tag}")
}

/// A replica of `shop/api`: labelled `app: api`, its 8080 named `http`.
fn api_replica(name: &str, ip: &str) -> Workload {
    api_replica_on(name, ip, APP_PORT)
}

/// A replica of `shop/api` whose port named `http` is `http_port`.
fn api_replica_on(name: &str, ip: &str, http_port: u16) -> Workload {
    Workload::new(name, NAMESPACE, "api", ip)
        .label("app", "api")
        .port("http", http_port)
}

/// A Service of namespace `shop` on `cluster_ip:80`, selecting `app: <app>`, sent to `target`.
fn service(name: &str, cluster_ip: &str, app: &str, target: impl Into<TargetPort>) -> Service {
    Service::new(name, NAMESPACE)
        .cluster_ip(cluster_ip)
        .selector("app", app)
        .port("http", SERVICE_PORT, target)
}

/// The proof that the node is shaped like a cluster's before any proxy is involved: an
/// unmeshed client calling a ClusterIP is balanced by the node's DNAT over both replicas, the
/// replies come back from the ClusterIP (un-NATed by conntrack), the replicas see the client's
/// own address, and rewriting the rules (scale down, no endpoints) takes effect at once.
#[test]
fn the_nodes_kube_proxy_rules_balance_a_cluster_ip_over_routed_pods() {
    let Some(mut node) = node("kube_proxy_rules", 70) else {
        return;
    };
    let client = node.add_pod("client", 2);
    let app1 = node.add_pod("app-1", 3);
    let app2 = node.add_pod("app-2", 4);
    node.serve_replica(&app1, APP_PORT);
    node.serve_replica(&app2, APP_PORT);
    node.install_service(
        API_IP,
        SERVICE_PORT,
        &[(&app1.ip, APP_PORT), (&app2.ip, APP_PORT)],
    );

    let url = who_url(API_IP, SERVICE_PORT, "dnat");
    let (answered, failed) = tally(&client, &url, 40);
    assert!(
        failed.is_empty(),
        "calls through the DNAT failed: {failed:?}"
    );
    for replica in ["app-1", "app-2"] {
        let n = answered.get(replica).copied().unwrap_or(0);
        assert!(
            n >= 10,
            "{replica} answered {n} of 40 calls: {answered:?}\n{}",
            node.node_rules()
        );
    }
    assert_eq!(
        node.dnat_packets(API_IP, SERVICE_PORT),
        40,
        "the Service rule did not see each connection once"
    );
    // No masquerade: the replica sees the client pod's address.
    assert!(
        node.log("app-1-app-8080")
            .contains(&format!("{} - - ", client.ip)),
        "app-1 did not see the client's own address"
    );
    // The pods reach each other directly too, through the node's routes.
    assert_eq!(
        call(&client, &who_url(&app2.ip, APP_PORT, "direct")).as_deref(),
        Ok("app-2")
    );

    node.install_service(API_IP, SERVICE_PORT, &[(&app1.ip, APP_PORT)]);
    let (answered, failed) = tally(&client, &url, 10);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.get("app-1"), Some(&10), "{answered:?}");
    assert!(
        !node
            .node_rules()
            .contains(&format!("{}:{APP_PORT}", app2.ip)),
        "app-2's rule outlived the scale down:\n{}",
        node.node_rules()
    );

    node.install_service(API_IP, SERVICE_PORT, &[]);
    let refused = call(&client, &url);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.starts_with("curl exit 7:")),
        "a Service without endpoints was not refused: {refused:?}"
    );
    node.finish();
}

/// The pods of the shared meshed node: `web` (the caller), `api-1` and `api-2` (replicas of
/// `shop/api`), `other` (meshed as `shop/other`, which policy `api-from-web` does not admit).
struct Shop {
    web: Pod,
    api1: Pod,
    api2: Pod,
    other: Pod,
}

/// The Services `api` (80 → 8080), `api-named` (80 → `http`, which is 8080 on `api-1` and
/// 8081 on `api-2`, as two versions of a Deployment may number it) and `empty` (selects
/// nothing), known to the CA and to the node's DNAT; `shop/api:8080` admits `shop/web` only.
fn shop(node: &mut Node) -> Shop {
    let (web_ip, api1_ip, api2_ip, other_ip) = (
        node.pod_ip(2),
        node.pod_ip(3),
        node.pod_ip(4),
        node.pod_ip(5),
    );
    node.write_mesh(
        &MeshFile::new("all-authenticated")
            .workload("web", NAMESPACE, "web", &web_ip)
            .add_workload(api_replica("api-1", &api1_ip))
            .add_workload(api_replica_on("api-2", &api2_ip, API2_HTTP_PORT))
            .workload("other", NAMESPACE, "other", &other_ip)
            .service(service("api", API_IP, "api", APP_PORT))
            .service(service("api-named", API_NAMED_IP, "api", "http"))
            .service(service("empty", EMPTY_IP, "nothing", APP_PORT))
            .policies(API_FROM_WEB),
    );
    node.start_ca("1h");
    node.install_service(
        API_IP,
        SERVICE_PORT,
        &[(&api1_ip, APP_PORT), (&api2_ip, APP_PORT)],
    );
    node.install_service(
        API_NAMED_IP,
        SERVICE_PORT,
        &[(&api1_ip, APP_PORT), (&api2_ip, API2_HTTP_PORT)],
    );
    node.install_service(EMPTY_IP, SERVICE_PORT, &[]);
    let web = node.add_pod("web", 2);
    let api1 = node.add_pod("api-1", 3);
    let api2 = node.add_pod("api-2", 4);
    let other = node.add_pod("other", 5);
    node.serve_replica(&api1, APP_PORT);
    node.serve_replica(&api2, APP_PORT);
    node.serve_replica(&api2, API2_HTTP_PORT);
    for (pod, sa) in [
        (&web, "web"),
        (&api1, "api"),
        (&api2, "api"),
        (&other, "other"),
    ] {
        node.mesh_pod(pod, sa, None);
    }
    Shop {
        web,
        api1,
        api2,
        other,
    }
}

/// Scenarios 1, 6, 7 and 8 share one node: each uses its own Service or caller, and counts
/// only its own requests (tagged in the URL) and metric series.
#[test]
fn meshed_clients_call_services_by_cluster_ip() {
    let Some(mut node) = node("meshed_services", 71) else {
        return;
    };
    let shop = shop(&mut node);
    a_service_spreads_over_its_meshed_replicas_in_mtls(&mut node, &shop);
    a_named_target_port_resolves_to_each_replicas_port(&mut node, &shop);
    a_service_without_ready_endpoints_is_refused_at_once(&mut node, &shop);
    policy_applies_through_the_service_as_through_the_pod_ip(&mut node, &shop);
    node.finish();
}

/// Scenario 1.
fn a_service_spreads_over_its_meshed_replicas_in_mtls(node: &mut Node, shop: &Shop) {
    let captures = [
        node.capture(&shop.api1, APP_PORT),
        node.capture(&shop.api2, APP_PORT),
    ];
    let dnat_before = node.dnat_packets(API_IP, SERVICE_PORT);
    let (answered, failed) = tally(&shop.web, &who_url(API_IP, SERVICE_PORT, "s1"), 40);
    println!("api: {answered:?}");
    assert!(
        failed.is_empty(),
        "web → api by ClusterIP failed: {failed:?}"
    );
    for replica in ["api-1", "api-2"] {
        let n = answered.get(replica).copied().unwrap_or(0);
        assert!(n >= 10, "{replica} answered {n} of 40 calls: {answered:?}");
    }
    for (capture, replica) in captures.into_iter().zip(["api-1", "api-2"]) {
        let pcap = node.finish_capture(capture);
        assert!(
            contains(&pcap, "palisade/1"),
            "no ClientHello offering ALPN palisade/1 on {replica}'s link"
        );
        assert!(
            !contains(&pcap, "GET /who"),
            "the request crossed {replica}'s link in clear"
        );
    }
    assert_eq!(
        node.dnat_packets(API_IP, SERVICE_PORT),
        dnat_before,
        "meshed connections went through the node's DNAT instead of straight to a replica"
    );
    for replica in ["api-1", "api-2"] {
        let log = node.log(&format!("{replica}-proxy"));
        assert!(
            log.lines()
                .any(|l| l.contains("connection allowed") && l.contains(&spiffe("web"))),
            "{replica}'s proxy logged no allowed connection from {}",
            spiffe("web")
        );
    }
    let service = "dst_service=\"shop/api\"";
    assert_eq!(
        node.metric_sum(
            &shop.web,
            "palisade_service_connections_total",
            &[service, "outcome=\"mtls\""]
        ),
        40.0,
        "web's proxy did not count 40 mTLS connections to shop/api"
    );
    assert_eq!(
        node.metric_sum(&shop.web, "palisade_balancer_picks_total", &[service]),
        40.0,
        "web's proxy did not count one balancer pick per connection"
    );
}

/// Scenario 6: `targetPort: http` is resolved per endpoint, to the port each replica names
/// `http` (8080 on `api-1`, 8081 on `api-2`), and the Service's port (80) is neither.
fn a_named_target_port_resolves_to_each_replicas_port(node: &mut Node, shop: &Shop) {
    let captures = [
        node.capture(&shop.api1, APP_PORT),
        node.capture(&shop.api2, API2_HTTP_PORT),
    ];
    let (answered, failed) = tally(&shop.web, &who_url(API_NAMED_IP, SERVICE_PORT, "s6"), 20);
    println!("api-named (targetPort: http): {answered:?}");
    assert!(
        failed.is_empty(),
        "web → api-named (targetPort: http) failed: {failed:?}"
    );
    assert!(
        answered.len() == 2,
        "20 calls did not reach both replicas: {answered:?}"
    );
    for (capture, replica) in captures.into_iter().zip(["api-1", "api-2"]) {
        let pcap = node.finish_capture(capture);
        assert!(
            contains(&pcap, "palisade/1") && !contains(&pcap, "GET /who"),
            "{replica} was not called in mTLS on the port it names http"
        );
    }
    assert_eq!(
        node.log(&format!("api-2-app-{API2_HTTP_PORT}"))
            .matches("GET /who?s6")
            .count(),
        answered["api-2"],
        "api-2 was not called on {API2_HTTP_PORT}, the port it names http"
    );
    assert!(
        !node.log("api-2-app-8080").contains("?s6"),
        "api-2 was called on 8080, api-1's number for http"
    );
    assert_eq!(
        node.metric_sum(
            &shop.web,
            "palisade_service_connections_total",
            &["dst_service=\"shop/api-named\"", "outcome=\"mtls\""]
        ),
        20.0
    );
}

/// Scenario 7: a Service whose selector picks nothing is refused by the client's proxy at
/// once, logged and counted.
fn a_service_without_ready_endpoints_is_refused_at_once(node: &mut Node, shop: &Shop) {
    let url = who_url(EMPTY_IP, SERVICE_PORT, "s7");
    // The first call may wait for the control plane's first answer about this address.
    let first = call(&shop.web, &url);
    assert!(
        first.is_err(),
        "a Service without endpoints answered: {first:?}"
    );
    let out = netns::command(&shop.web.netns, Some(APP_UID), "curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
            "--max-time",
            "5",
        ])
        .arg(&url)
        .output()
        .expect("curl runs");
    let took: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("curl printed its time_total");
    assert!(
        !out.status.success(),
        "a Service without endpoints answered the second call"
    );
    assert!(
        took < 0.1,
        "the refusal took {took} s (curl: {})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    println!(
        "no endpoints: refused after {took} s ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let log = node.log("web-proxy");
    assert!(
        log.lines().any(
            |l| l.contains("no ready endpoint") && l.contains("\"dst_service\":\"shop/empty\"")
        ),
        "web's proxy did not log `no ready endpoint` with dst_service shop/empty"
    );
    assert_eq!(
        node.metric_sum(
            &shop.web,
            "palisade_service_connections_total",
            &["dst_service=\"shop/empty\"", "outcome=\"no_endpoints\""]
        ),
        2.0
    );
}

/// Scenario 8: `shop/other` may not call `shop/api:8080`; through the ClusterIP it is refused
/// by the replica's policy exactly as when it calls the pod's address.
fn policy_applies_through_the_service_as_through_the_pod_ip(node: &mut Node, shop: &Shop) {
    let denials = |node: &Node| -> f64 {
        [&shop.api1, &shop.api2]
            .into_iter()
            .map(|p| {
                node.metric(
                    p,
                    "palisade_policy_decisions_total{result=\"deny\",reason=\"no_rule_matched\"}",
                )
            })
            .sum()
    };
    let before = denials(node);
    let by_service = call(&shop.other, &who_url(API_IP, SERVICE_PORT, "s8"));
    let after_service = denials(node);
    let by_pod = call(&shop.other, &who_url(&shop.api1.ip, APP_PORT, "s8"));
    let after_pod = denials(node);
    assert!(
        by_service.is_err(),
        "shop/other reached shop/api through the ClusterIP: {by_service:?}"
    );
    assert!(
        by_pod.is_err(),
        "shop/other reached shop/api by pod IP: {by_pod:?}"
    );
    let code = |r: &Result<String, String>| {
        r.as_ref()
            .err()
            .and_then(|e| e.split(':').next())
            .map(str::to_owned)
    };
    assert_eq!(
        code(&by_service),
        code(&by_pod),
        "the two refusals differ: {by_service:?} vs {by_pod:?}"
    );
    assert_eq!(
        (after_service - before, after_pod - after_service),
        (1.0, 1.0),
        "the replicas' policy did not refuse each call exactly once"
    );
    for replica in ["api-1", "api-2"] {
        assert!(
            !node.log(&format!("{replica}-app-8080")).contains("?s8"),
            "shop/other's request reached {replica}'s app"
        );
    }
    let events: Vec<String> = ["api-1", "api-2"]
        .iter()
        .flat_map(|r| {
            node.log(&format!("{r}-proxy"))
                .lines()
                .filter(|l| l.contains("\"result\":\"deny\"") && l.contains(&spiffe("other")))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        events.len(),
        2,
        "expected one denial event per call naming {}: {events:?}",
        spiffe("other")
    );
}

/// Pods `web`, `api-1`, `api-2` and the Service `api` over both replicas, on the CA and the
/// node's DNAT.
fn web_and_two_replicas(node: &mut Node) -> (Pod, Pod, Pod) {
    let (web_ip, api1_ip, api2_ip) = (node.pod_ip(2), node.pod_ip(3), node.pod_ip(4));
    node.write_mesh(&two_replicas_mesh(&web_ip, &[&api1_ip, &api2_ip], &[]));
    node.start_ca("1h");
    node.install_service(
        API_IP,
        SERVICE_PORT,
        &[(&api1_ip, APP_PORT), (&api2_ip, APP_PORT)],
    );
    let web = node.add_pod("web", 2);
    let api1 = node.add_pod("api-1", 3);
    let api2 = node.add_pod("api-2", 4);
    node.serve_replica(&api1, APP_PORT);
    node.serve_replica(&api2, APP_PORT);
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&api1, "api", None);
    node.mesh_pod(&api2, "api", None);
    (web, api1, api2)
}

/// `web` and the replicas at `replica_ips` (named `api-<n>`), the Service `api` selecting
/// them.
/// Replicas whose address is in `draining` stay workloads (their identity and policy stay) but
/// leave the Service's endpoints, as a scaled-down pod leaves its EndpointSlice while it
/// finishes its connections: the Service selects `serving: "true"` as well.
fn two_replicas_mesh(web_ip: &str, replica_ips: &[&str], draining: &[&str]) -> MeshFile {
    replica_ips
        .iter()
        .enumerate()
        .fold(
            MeshFile::new("all-authenticated").workload("web", NAMESPACE, "web", web_ip),
            |m, (i, ip)| {
                let serving = if draining.contains(ip) {
                    "false"
                } else {
                    "true"
                };
                m.add_workload(api_replica(&format!("api-{}", i + 1), ip).label("serving", serving))
            },
        )
        .service(service("api", API_IP, "api", APP_PORT).selector("serving", "true"))
        .policies(API_FROM_WEB)
}

/// One call made by the load loop: when it started, and who answered.
struct Sample {
    started: Instant,
    answer: Result<String, String>,
}

/// Scenario 2.
#[test]
fn scaling_down_moves_new_connections_off_the_removed_replica_without_failures() {
    let Some(mut node) = node("scale_down", 72) else {
        return;
    };
    let (web, api1, api2) = web_and_two_replicas(&mut node);
    let url = who_url(API_IP, SERVICE_PORT, "s2");
    let limit = Duration::from_secs(30);
    let mut updated_at = None;
    let stop = AtomicBool::new(false);
    let samples = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let started = Instant::now();
            let mut samples = Vec::new();
            while samples.len() < 400 && started.elapsed() < limit && !stop.load(Ordering::Relaxed)
            {
                let t = Instant::now();
                samples.push(Sample {
                    started: t,
                    answer: call(&web, &url),
                });
            }
            samples
        });
        // Load before the update: until both replicas answered (bounded by the loop's limit).
        std::thread::sleep(Duration::from_secs(2));
        node.write_mesh(&two_replicas_mesh(
            &web.ip,
            &[&api1.ip, &api2.ip],
            &[&api2.ip],
        ));
        node.install_service(API_IP, SERVICE_PORT, &[(&api1.ip, APP_PORT)]);
        updated_at = Some(Instant::now());
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("the load loop")
    });
    let updated_at = updated_at.unwrap();
    let failed: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed across the scale down: {failed:?}",
        failed.len(),
        samples.len()
    );
    let answered = |from: Instant, to: Instant| -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.started >= from && s.started < to)
        {
            if let Ok(who) = &s.answer {
                *m.entry(who.as_str()).or_insert(0) += 1;
            }
        }
        m
    };
    let first = samples.first().expect("the load loop ran").started;
    let last_to_removed = samples
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("api-2"))
        .map(|s| s.started)
        .max();
    if let Some(t) = last_to_removed.filter(|t| *t >= updated_at) {
        println!(
            "the last call api-2 answered started {:?} after the update",
            t - updated_at
        );
    }
    let before = answered(first, updated_at);
    // The control plane's update reaches the proxy within a second.
    let settled = updated_at + Duration::from_secs(1);
    let after = answered(settled, Instant::now());
    println!(
        "{} calls; before the update {before:?}, from 1 s after it {after:?}",
        samples.len()
    );
    assert_eq!(before.len(), 2, "both replicas answered before: {before:?}");
    assert!(
        after.get("api-1").copied().unwrap_or(0) >= 20 && after.len() == 1,
        "new connections still reached api-2 a second after it was removed: {after:?}"
    );
    node.finish();
}

/// Scenario 3.
#[test]
fn a_replica_whose_proxy_died_is_skipped_by_retrying_the_other() {
    let Some(mut node) = node("dead_proxy", 73) else {
        return;
    };
    let (web, _api1, api2) = web_and_two_replicas(&mut node);
    let url = who_url(API_IP, SERVICE_PORT, "s3");
    let (answered, failed) = tally(&web, &url, 10);
    assert!(
        failed.is_empty() && answered.len() == 2,
        "{answered:?} {failed:?}"
    );
    node.kill_proxy(&api2);
    // The replica is still listed as ready (its pod runs), but its capture now leads nowhere.
    let direct = call(&web, &who_url(&api2.ip, APP_PORT, "s3-direct"));
    assert!(
        direct.is_err(),
        "api-2 still answers with its proxy dead: {direct:?}"
    );
    let (answered, failed) = tally(&web, &url, 30);
    assert!(
        failed.is_empty(),
        "{} of 30 calls failed with api-2's proxy dead: {failed:?}",
        failed.len()
    );
    assert_eq!(answered.get("api-1"), Some(&30), "{answered:?}");
    let failures = node.metric_sum(
        &web,
        "palisade_service_endpoint_failures_total",
        &["dst_service=\"shop/api\""],
    );
    println!("{failures} connect failures to api-2 retried on api-1");
    assert!(
        failures >= 1.0,
        "web's proxy counted no endpoint failure: the balancer never tried api-2"
    );
    node.finish();
}

/// Scenarios 4 and 5: Services with endpoints outside the mesh.
#[test]
fn services_with_unmeshed_endpoints_are_reached_in_plain_tcp_per_endpoint() {
    let Some(mut node) = node("unmeshed_endpoints", 74) else {
        return;
    };
    let (web_ip, api1_ip, legacy1_ip, legacy2_ip) = (
        node.pod_ip(2),
        node.pod_ip(3),
        node.pod_ip(6),
        node.pod_ip(7),
    );
    node.write_mesh(
        &MeshFile::new("all-authenticated")
            .workload("web", NAMESPACE, "web", &web_ip)
            .add_workload(api_replica("api-1", &api1_ip))
            // Hand-made endpoints (a Service without selector): unmeshed unless the address
            // is a workload's.
            .service(
                Service::new("legacy", NAMESPACE)
                    .cluster_ip(LEGACY_IP)
                    .port("http", SERVICE_PORT, APP_PORT)
                    .endpoint(&legacy1_ip)
                    .endpoint(&legacy2_ip),
            )
            .service(
                Service::new("mixed", NAMESPACE)
                    .cluster_ip(MIXED_IP)
                    .port("http", SERVICE_PORT, APP_PORT)
                    .endpoint(&api1_ip)
                    .endpoint(&legacy1_ip),
            )
            .policies(API_FROM_WEB),
    );
    node.start_ca("1h");
    node.install_service(
        LEGACY_IP,
        SERVICE_PORT,
        &[(&legacy1_ip, APP_PORT), (&legacy2_ip, APP_PORT)],
    );
    node.install_service(
        MIXED_IP,
        SERVICE_PORT,
        &[(&api1_ip, APP_PORT), (&legacy1_ip, APP_PORT)],
    );
    let web = node.add_pod("web", 2);
    let api1 = node.add_pod("api-1", 3);
    let legacy1 = node.add_pod("legacy-1", 6);
    let legacy2 = node.add_pod("legacy-2", 7);
    for pod in [&api1, &legacy1, &legacy2] {
        node.serve_replica(pod, APP_PORT);
    }
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&api1, "api", None);

    // Scenario 4: the client's proxy connects to the chosen endpoint's address itself, in
    // plain TCP; the node's DNAT is not involved.
    let capture = node.capture(&legacy1, APP_PORT);
    let dnat_before = node.dnat_packets(LEGACY_IP, SERVICE_PORT);
    let (answered, failed) = tally(&web, &who_url(LEGACY_IP, SERVICE_PORT, "s4"), 20);
    assert!(failed.is_empty(), "web → legacy failed: {failed:?}");
    assert_eq!(
        answered.len(),
        2,
        "20 calls did not reach both: {answered:?}"
    );
    let pcap = node.finish_capture(capture);
    assert!(
        contains(&pcap, "GET /who?s4") && !contains(&pcap, "palisade/1"),
        "the call to an unmeshed endpoint was not plain TCP"
    );
    assert_eq!(
        node.dnat_packets(LEGACY_IP, SERVICE_PORT),
        dnat_before,
        "the call went through the node's DNAT"
    );
    let legacy = "dst_service=\"shop/legacy\"";
    let series = |outcome: &str| {
        node.metric_sum(
            &web,
            "palisade_service_connections_total",
            &[legacy, &format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(series("plaintext"), 20.0);
    assert_eq!(series("mtls"), 0.0, "plaintext was counted as mTLS");

    // Scenario 5: each endpoint as its own status says.
    let captures = [
        node.capture(&api1, APP_PORT),
        node.capture(&legacy1, APP_PORT),
    ];
    let (answered, failed) = tally(&web, &who_url(MIXED_IP, SERVICE_PORT, "s5"), 20);
    assert!(failed.is_empty(), "web → mixed failed: {failed:?}");
    assert_eq!(
        answered.len(),
        2,
        "20 calls did not reach both: {answered:?}"
    );
    let [meshed, unmeshed] = captures.map(|c| node.finish_capture(c));
    assert!(
        contains(&meshed, "palisade/1") && !contains(&meshed, "GET /who"),
        "the meshed endpoint of shop/mixed was not called in mTLS"
    );
    assert!(
        contains(&unmeshed, "GET /who?s5") && !contains(&unmeshed, "palisade/1"),
        "the unmeshed endpoint of shop/mixed was not called in plain TCP"
    );
    let mixed = "dst_service=\"shop/mixed\"";
    let count = |outcome: &str| {
        node.metric_sum(
            &web,
            "palisade_service_connections_total",
            &[mixed, &format!("outcome=\"{outcome}\"")],
        )
    };
    assert_eq!(
        (count("mtls") as usize, count("plaintext") as usize),
        (answered["api-1"], answered["legacy-1"]),
        "the proxy's counts differ from who answered"
    );
    node.finish();
}
