//! What the Service tests share: a routed node, the Services' addresses and ports, the replicas
//! of `shop/api`, and calls made the way an app makes them.

use std::collections::BTreeMap;

use palisade_testkit::mesh_file::{Service, TargetPort, Workload};
use palisade_testkit::netns;

use super::node::{self, APP_UID, NAMESPACE, Node, Pod};

pub const BODY: &str = "the mesh says hello";
/// The Service every meshed scenario calls: two replicas of `shop/api` serving on 8080.
pub const API_IP: &str = "10.96.0.10";
/// The same replicas through a named target port (`targetPort: http`).
pub const API_NAMED_IP: &str = "10.96.0.11";
/// A Service whose selector picks no pod.
pub const EMPTY_IP: &str = "10.96.0.12";
/// A Service whose endpoints have no proxy.
pub const LEGACY_IP: &str = "10.96.0.20";
/// A Service with one meshed and one unmeshed endpoint.
pub const MIXED_IP: &str = "10.96.0.21";
/// The port the Services listen on; the apps listen on [`APP_PORT`].
pub const SERVICE_PORT: u16 = 80;
pub const APP_PORT: u16 = 8080;
/// Where `api-2` of the shared node serves the port it names `http` (`api-1`: [`APP_PORT`]).
pub const API2_HTTP_PORT: u16 = 8081;

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}")
}

/// A routed node, or `None` (after printing why) where these tests cannot run.
pub fn node(test: &str, net: u8) -> Option<Node> {
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
pub fn call(pod: &Pod, url: &str) -> Result<String, String> {
    netns::curl(
        &pod.netns,
        Some(APP_UID),
        &["-sS", "-f", "--max-time", "5", url],
    )
    .map(|b| b.trim().to_owned())
}

/// `n` calls of `url` from `pod`, each on a new connection: how many each replica answered
/// (by the `who` it serves), and the errors.
pub fn tally(pod: &Pod, url: &str, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
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

pub fn who_url(ip: &str, port: u16, tag: &str) -> String {
    format!("http://{ip}:{port}/who?{tag}")
}

/// A replica of `shop/api`: labelled `app: api`, its 8080 named `http`.
pub fn api_replica(name: &str, ip: &str) -> Workload {
    api_replica_on(name, ip, APP_PORT)
}

/// A replica of `shop/api` whose port named `http` is `http_port`.
pub fn api_replica_on(name: &str, ip: &str, http_port: u16) -> Workload {
    Workload::new(name, NAMESPACE, "api", ip)
        .label("app", "api")
        .port("http", http_port)
}

/// A Service of namespace `shop` on `cluster_ip:80`, selecting `app: <app>`, sent to `target`.
pub fn service(name: &str, cluster_ip: &str, app: &str, target: impl Into<TargetPort>) -> Service {
    Service::new(name, NAMESPACE)
        .cluster_ip(cluster_ip)
        .selector("app", app)
        .port("http", SERVICE_PORT, target)
}
