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

use palisade_testkit::capture::contains;
use palisade_testkit::mesh_file::{API_FROM_WEB, MeshFile};
use palisade_testkit::netns;
use support::node::{APP_UID, NAMESPACE, Node, Pod};

use support::services::*;

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
    // With pooled tunnels an app connection rides a tunnel whose TCP connection may have been
    // made earlier, to another port of the same replica: so api-2 is watched on both of its
    // ports, for plaintext, and the mTLS outcome is the proxy's count below.
    let captures = [
        node.capture(&shop.api1, APP_PORT),
        node.capture(&shop.api2, API2_HTTP_PORT),
        node.capture(&shop.api2, APP_PORT),
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
    for (capture, replica) in captures.into_iter().zip(["api-1", "api-2", "api-2"]) {
        let pcap = node.finish_capture(capture);
        assert!(
            !contains(&pcap, "GET /who"),
            "{replica} was called in plaintext"
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
