//! The whole mesh on one machine, the way a cluster runs it: a node with `palisade-ca` (file
//! source, local tokens) and pods in network namespaces, each meshed pod with
//! `palisade-proxy init` (iptables capture) and `palisade-proxy run` as uid 1337 next to an
//! unmodified app (`curl`, `python3 -m http.server`) running as another uid.
//!
//! Needs root (network namespaces, iptables) and the workspace's binaries (`cargo build
//! --workspace --bins`); each test prints why it is skipped when not root.

mod support;

use std::time::{Duration, Instant};

use palisade_testkit::capture::contains;
use palisade_testkit::mesh_file::{API_FROM_WEB, MeshFile};
use palisade_testkit::netns;
use support::node::{self, Node, Pod};

const BODY: &str = "the mesh says hello";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{}/sa/{sa}", node::NAMESPACE)
}

/// A node, or `None` (after printing why) where these tests cannot run.
fn node(test: &str, net: u8) -> Option<Node> {
    if netns::skip(test, node::TOOLS) {
        return None;
    }
    let n = Node::new(net);
    n.publish("hello.txt", BODY);
    Some(n)
}

/// A mesh file: `workloads` of namespace `shop` as (name, service account, ip), then
/// `policies` verbatim.
fn mesh(default_policy: &str, workloads: &[(&str, &str, &str)], policies: &str) -> MeshFile {
    workloads
        .iter()
        .fold(MeshFile::new(default_policy), |m, (name, sa, ip)| {
            m.workload(name, node::NAMESPACE, sa, ip)
        })
        .policies(policies)
}

/// Starts the usual two pods: `web` (.2, calls) and `api` (.3, serves HTTP on 8080), both
/// meshed, with the CA issuing certificates of lifetime `ttl`.
fn web_and_api(node: &mut Node, ttl: &str, extra: &[(&str, &str, &str)]) -> (Pod, Pod) {
    let (web_ip, api_ip) = (node.pod_ip(2), node.pod_ip(3));
    let mut workloads = vec![
        ("web", "web", web_ip.as_str()),
        ("api", "api", api_ip.as_str()),
    ];
    workloads.extend_from_slice(extra);
    node.write_mesh(&mesh("all-authenticated", &workloads, API_FROM_WEB));
    node.start_ca(ttl);
    let web = node.add_pod("web", 2);
    let api = node.add_pod("api", 3);
    node.serve_http(&api, 8080);
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&api, "api", None);
    (web, api)
}

fn url(pod: &Pod, port: u16) -> String {
    format!("http://{}:{port}/hello.txt", pod.ip)
}

#[test]
fn allowed_call_crosses_the_link_as_mtls_with_alpn_palisade_and_no_plaintext() {
    let Some(mut node) = node("allowed_call", 61) else {
        return;
    };
    let (web, api) = web_and_api(&mut node, "1h", &[]);
    let capture = node.capture(&api, 8080);
    let body = node
        .app_get(&web, &url(&api, 8080))
        .expect("web → api:8080 is allowed");
    assert_eq!(body.trim(), BODY);
    let pcap = node.finish_capture(capture);
    assert!(!pcap.is_empty(), "the capture on api's link is empty");
    assert!(
        contains(&pcap, "palisade/1"),
        "no ClientHello offering ALPN palisade/1 on api's link"
    );
    assert!(
        !contains(&pcap, BODY) && !contains(&pcap, "GET /hello.txt"),
        "request or response bytes crossed the link in clear"
    );
    let allowed = node.metric_sum(
        &api,
        "palisade_policy_decisions_total",
        &["result=\"allow\""],
    );
    assert!(allowed >= 1.0, "api's proxy counted no allow decision");
    // The server app saw the request from its own proxy, on loopback, in clear.
    assert!(node.log("api-app-8080").contains("GET /hello.txt"));
    node.finish();
}

#[test]
fn a_service_account_the_policy_does_not_list_is_refused_and_counted() {
    let Some(mut node) = node("denied_service_account", 62) else {
        return;
    };
    let intruder_ip = node.pod_ip(4);
    let (web, api) = web_and_api(&mut node, "1h", &[("intruder", "intruder", &intruder_ip)]);
    let intruder = node.add_pod("intruder", 4);
    node.mesh_pod(&intruder, "intruder", None);
    node.app_get(&web, &url(&api, 8080))
        .expect("web → api is allowed");
    let refused = node.app_get(&intruder, &url(&api, 8080));
    assert!(refused.is_err(), "shop/intruder reached api: {refused:?}");
    assert_eq!(
        node.metric(
            &api,
            "palisade_policy_decisions_total{result=\"deny\",reason=\"no_rule_matched\"}"
        ),
        1.0,
        "api's proxy did not count the denial with its reason"
    );
    // Who called which port, and what was decided: what `palisade policy suggest` reads.
    for (sa, decision) in [("web", "allow"), ("intruder", "deny")] {
        let series = format!(
            "palisade_inbound_connections_total{{client_id=\"{}\",port=\"8080\",decision=\"{decision}\"}}",
            spiffe(sa)
        );
        let count = node.metric(&api, &series);
        assert!(
            count >= 1.0 && (decision == "allow" || count == 1.0),
            "{series}: {count}"
        );
    }
    let log = node.log("api-proxy");
    let event = log
        .lines()
        .find(|l| l.contains("\"result\":\"deny\""))
        .expect("no denial event in api's proxy log");
    for field in [
        spiffe("intruder").as_str(),
        "\"target_workload\":\"shop/api\"",
        "api-from-web",
        "no_rule_matched",
    ] {
        assert!(
            event.contains(field),
            "the denial event lacks {field}: {event}"
        );
    }
    node.finish();
}

#[test]
fn a_plaintext_caller_is_refused_unless_a_policy_admits_unauthenticated() {
    let Some(mut node) = node("plaintext_caller", 63) else {
        return;
    };
    let api_ip = node.pod_ip(3);
    // Port 8080 falls to the default (all-authenticated); port 9090 admits plaintext.
    let policies = "  - metadata: {name: legacy-scrapers, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [9090], allow: [{unauthenticated: true}]}
";
    node.write_mesh(&mesh(
        "all-authenticated",
        &[("api", "api", &api_ip)],
        policies,
    ));
    node.start_ca("1h");
    let api = node.add_pod("api", 3);
    let plain = node.add_pod("plain", 5);
    node.serve_http(&api, 8080);
    node.serve_http(&api, 9090);
    node.mesh_pod(&api, "api", None);

    let refused = node.app_get(&plain, &url(&api, 8080));
    assert!(
        refused.is_err(),
        "a plaintext caller reached api:8080: {refused:?}"
    );
    assert_eq!(
        node.metric(
            &api,
            "palisade_policy_decisions_total{result=\"deny\",reason=\"plaintext_not_allowed\"}"
        ),
        1.0
    );
    assert!(!node.log("api-app-8080").contains("GET /hello.txt"));

    let body = node
        .app_get(&plain, &url(&api, 9090))
        .expect("a policy with unauthenticated: true admits plaintext on 9090");
    assert_eq!(body.trim(), BODY);
    node.finish();
}

#[test]
fn a_meshed_client_reaches_a_pod_without_proxy_in_plain_tcp() {
    let Some(mut node) = node("non_meshed_destination", 64) else {
        return;
    };
    let web_ip = node.pod_ip(2);
    node.write_mesh(&mesh("all-authenticated", &[("web", "web", &web_ip)], ""));
    node.start_ca("1h");
    let web = node.add_pod("web", 2);
    let legacy = node.add_pod("legacy", 6);
    node.serve_http(&legacy, 8080);
    node.mesh_pod(&web, "web", None);
    let capture = node.capture(&legacy, 8080);
    let body = node
        .app_get(&web, &url(&legacy, 8080))
        .expect("web → a pod outside the mesh passes through");
    assert_eq!(body.trim(), BODY);
    let pcap = node.finish_capture(capture);
    assert!(
        contains(&pcap, "GET /hello.txt") && !contains(&pcap, "palisade/1"),
        "the call to a pod outside the mesh was not plain TCP"
    );
    // It went through web's proxy (captured), not around it.
    let outbound = node.metric_sum(
        &web,
        "palisade_connections_opened_total",
        &["direction=\"outbound\""],
    );
    assert!(outbound >= 1.0, "web's proxy saw no outbound connection");
    node.finish();
}

#[test]
fn removing_an_allow_rule_refuses_the_next_connection_within_two_seconds() {
    let Some(mut node) = node("policy_change", 65) else {
        return;
    };
    let (web, api) = web_and_api(&mut node, "1h", &[]);
    node.app_get(&web, &url(&api, 8080))
        .expect("web → api is allowed at first");
    let (web_ip, api_ip) = (node.pod_ip(2), node.pod_ip(3));
    node.write_mesh(&mesh(
        "all-authenticated",
        &[("web", "web", &web_ip), ("api", "api", &api_ip)],
        &API_FROM_WEB.replace("shop/web", "shop/checkout"),
    ));
    let edited = Instant::now();
    let mut refused_after = None;
    while edited.elapsed() < Duration::from_secs(2) {
        if node.app_get(&web, &url(&api, 8080)).is_err() {
            refused_after = Some(edited.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = refused_after.expect("web still reaches api 2 s after its allow rule was removed");
    println!("refused {after:?} after the mesh file changed");
    assert!(
        node.metric(
            &api,
            "palisade_policy_decisions_total{result=\"deny\",reason=\"no_rule_matched\"}"
        ) >= 1.0
    );
    node.finish();
}

/// Sends requests web → api back to back until `done` holds or `limit` passes; returns
/// (succeeded, failed).
fn load_until(
    node: &Node,
    web: &Pod,
    api: &Pod,
    limit: Duration,
    mut done: impl FnMut(&Node) -> bool,
) -> (u32, u32) {
    let deadline = Instant::now() + limit;
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < deadline {
        match node.app_get(web, &url(api, 8080)) {
            Ok(b) if b.trim() == BODY => ok += 1,
            _ => failed += 1,
        }
        if ok % 10 == 0 && done(node) {
            break;
        }
    }
    (ok, failed)
}

#[test]
fn continuous_requests_survive_two_rotations_on_both_sides() {
    let Some(mut node) = node("rotation_under_load", 66) else {
        return;
    };
    // 20 s certificates renew 8–12 s after they arrive.
    let (web, api) = web_and_api(&mut node, "20s", &[]);
    let mut serials = [vec![node.serial(&web)], vec![node.serial(&api)]];
    let (ok, failed) = load_until(&node, &web, &api, Duration::from_secs(90), |n| {
        for (seen, pod) in serials.iter_mut().zip([&web, &api]) {
            let s = n.serial(pod);
            if !seen.contains(&s) {
                seen.push(s);
            }
        }
        serials.iter().all(|s| s.len() >= 3)
    });
    println!(
        "{ok} requests, {failed} failed; web serials {:?}, api serials {:?}",
        serials[0], serials[1]
    );
    assert!(
        serials[0].len() >= 3,
        "web rotated fewer than twice: {:?}",
        serials[0]
    );
    assert!(
        serials[1].len() >= 3,
        "api rotated fewer than twice: {:?}",
        serials[1]
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across rotations",
        ok + failed
    );
    assert!(ok >= 50, "too few requests to speak of load: {ok}");
    node.finish();
}

#[test]
fn a_ca_outage_keeps_traffic_flowing_and_rotation_resumes_with_the_same_root() {
    let Some(mut node) = node("ca_outage", 67) else {
        return;
    };
    // 60 s certificates renew 24–36 s after they arrive: the outage covers a renewal.
    let (web, api) = web_and_api(&mut node, "60s", &[]);
    // Traffic that flows when the CA goes away: web's proxy has learnt api's identity. (A
    // destination first seen during the outage is refused instead: nobody can say whether
    // it is meshed, and the proxy fails closed.)
    node.app_get(&web, &url(&api, 8080))
        .expect("web → api before the outage");
    let before = [node.serial(&web), node.serial(&api)];
    node.stop_ca();
    let failures = |n: &Node, p: &Pod| n.metric(p, "palisade_certificate_rotation_failures_total");
    let (ok, failed) = load_until(&node, &web, &api, Duration::from_secs(60), |n| {
        failures(n, &web) >= 1.0 && failures(n, &api) >= 1.0
    });
    assert!(
        failures(&node, &web) >= 1.0 && failures(&node, &api) >= 1.0,
        "no renewal was attempted while the CA was down"
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed with the CA down",
        ok + failed
    );
    assert_eq!(
        [node.serial(&web), node.serial(&api)],
        before,
        "a certificate changed with no CA"
    );
    println!("{ok} requests with the CA down, none failed");

    node.start_ca("60s");
    let (ok2, failed2) = load_until(&node, &web, &api, Duration::from_secs(60), |n| {
        n.serial(&web) != before[0] && n.serial(&api) != before[1]
    });
    assert!(
        node.serial(&web) != before[0] && node.serial(&api) != before[1],
        "rotation did not resume after the CA came back"
    );
    assert_eq!(
        failed2,
        0,
        "{failed2} of {} requests failed after the CA came back",
        ok2 + failed2
    );
    let root = std::fs::read_to_string(node.trust_bundle_file()).unwrap();
    let served: serde_json::Value = serde_json::from_str(&node.served_trust_bundle()).unwrap();
    let roots: Vec<&str> = served["trust_bundle"]
        .as_array()
        .expect("trust_bundle is a list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "the restarted CA serves {} roots",
        roots.len()
    );
    assert_eq!(
        roots[0].trim(),
        root.trim(),
        "the root changed across the restart"
    );
    node.finish();
}

#[test]
fn a_valid_certificate_of_another_identity_is_refused_by_the_client_proxy() {
    let Some(mut node) = node("impersonation", 68) else {
        return;
    };
    // The control plane says 10.77.68.3 is shop/api. A pod of shop/impostor (registered at
    // .4, with a valid certificate for shop/impostor) holds the address .3 instead.
    let (web_ip, api_ip, impostor_ip) = (node.pod_ip(2), node.pod_ip(3), node.pod_ip(4));
    node.write_mesh(&mesh(
        "all",
        &[
            ("web", "web", &web_ip),
            ("api", "api", &api_ip),
            ("impostor", "impostor", &impostor_ip),
        ],
        "",
    ));
    node.start_ca("1h");
    let web = node.add_pod("web", 2);
    let impostor = node.add_pod("impostor", 3);
    node.serve_http(&impostor, 8080);
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&impostor, "impostor", Some(&impostor_ip));

    let refused = node.app_get(&web, &url(&impostor, 8080));
    assert!(
        refused.is_err(),
        "web talked to shop/impostor posing as shop/api: {refused:?}"
    );
    assert_eq!(
        node.metric(
            &web,
            "palisade_tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_identity\"}"
        ),
        1.0,
        "web's proxy did not count the wrong identity"
    );
    let log = node.log("web-proxy");
    assert!(
        log.lines()
            .any(|l| l.contains("mTLS handshake failed") && l.contains(&spiffe("api"))),
        "web's proxy did not log the identity it expected"
    );
    assert!(
        !node.log("impostor-app-8080").contains("GET /hello.txt"),
        "the request reached the impostor's app"
    );
    node.finish();
}

#[test]
fn a_listener_the_app_keeps_on_loopback_is_not_reachable_through_the_mesh() {
    let Some(mut node) = node("loopback_listener", 69) else {
        return;
    };
    let legacy_ip = node.pod_ip(5);
    let (web, api) = web_and_api(&mut node, "1h", &[("legacy", "legacy", &legacy_ip)]);
    node.serve_http_on_loopback(&api, 9090);
    // A pod that opted port 9090 back into loopback forwarding
    // (palisade.dev/inbound-loopback-ports: "9090").
    let legacy = node.add_pod("legacy", 5);
    node.serve_http_on_loopback(&legacy, 9090);
    node.mesh_pod_with(
        &legacy,
        "legacy",
        None,
        &[("PALISADE_INBOUND_LOOPBACK_PORTS", "9090")],
    );

    node.app_get(&web, &url(&api, 8080))
        .expect("web → api:8080 is allowed");
    // The app sees the call come to its pod address from its own proxy, not from loopback.
    let served = node.log("api-app-8080");
    assert!(
        served
            .lines()
            .any(|l| l.starts_with(&format!("{} ", api.ip)) && l.contains("GET /hello.txt")),
        "the app did not see the call arrive on the pod's address:\n{served}"
    );
    let reached = node.app_get(&web, &url(&api, 9090));
    assert!(
        reached.is_err(),
        "a mesh caller reached api's loopback-only port 9090: {reached:?}"
    );
    assert!(
        !node.log("api-app-9090").contains("GET /hello.txt"),
        "the loopback-only app answered a mesh caller"
    );
    assert!(
        node.metric(
            &api,
            "palisade_connections_refused_total{direction=\"inbound\",reason=\"app_unreachable\"}"
        ) >= 1.0
    );
    node.app_get(&web, &url(&legacy, 9090))
        .expect("a port opted into loopback forwarding is reached as before");
    node.finish();
}

#[test]
fn inbound_udp_is_dropped_except_replies_and_the_ports_a_pod_lists() {
    let Some(mut node) = node("inbound_udp", 60) else {
        return;
    };
    let (web, api) = (node.pod_ip(2), node.pod_ip(3));
    node.write_mesh(&mesh(
        "all-authenticated",
        &[("web", "web", &web), ("api", "api", &api)],
        API_FROM_WEB,
    ));
    node.start_ca("1h");
    let web = node.add_pod("web", 2);
    let api = node.add_pod("api", 3);
    node.serve_http(&api, 8080);
    node.serve_udp_echo(Some(&api), 5300);
    node.serve_udp_echo(Some(&api), 5301);
    node.serve_udp_echo(None, 5353);
    node.mesh_pod(&web, "web", None);
    // As palisade.dev/inbound-udp-ports: "5301" makes the injector run init.
    node.mesh_pod_with(
        &api,
        "api",
        None,
        &[("PALISADE_ALLOW_INBOUND_UDP_PORTS", "5301")],
    );
    let udp = |port: u16| format!("{}:{port}", api.ip);
    // The proxy carries TCP only: policy cannot judge a UDP caller, so it is kept out...
    assert_eq!(
        node.udp_ask(&web, &udp(5300)),
        None,
        "a UDP service of a meshed pod answered a caller no policy saw"
    );
    // ...unless the pod lists the port,
    assert_eq!(node.udp_ask(&web, &udp(5301)).as_deref(), Some("ping"));
    // and the pod's own requests still get their answers (a DNS server's, say).
    let resolver = format!("{}:5353", node.node_ip());
    assert_eq!(node.udp_ask(&api, &resolver).as_deref(), Some("ping"));
    // TCP is untouched.
    node.app_get(&web, &url(&api, 8080))
        .expect("web → api over the mesh");
    node.finish();
}
