//! Kubernetes Services through the mesh when replicas come and go: a scale-down under load, a
//! replica whose proxy died, and Services whose endpoints have no proxy (all or one of two). The
//! node is shaped like a cluster's, as in `services_netns.rs`.
//!
//! Needs root (network namespaces, iptables) and the workspace's binaries (`cargo build
//! --workspace --bins`); each test prints why it is skipped when not root.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_testkit::capture::contains;
use palisade_testkit::mesh_file::{API_FROM_WEB, MeshFile, Service};
use support::node::{NAMESPACE, Node, Pod};
use support::services::*;

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
