//! Pooled tunnels between two proxies on loopback: app connections share a handshake, policy
//! is still decided per app connection, and a tunnel takes no new stream once the
//! certificates, bundle, identity or validity it was verified under have changed.

mod support;

use std::time::{Duration, SystemTime};

use palisade_ca_api::policy::DefaultPolicy;
use palisade_proxy::clock::Clock;
use palisade_proxy::identity::Installed;
use palisade_proxy::metrics::Direction;
use palisade_testkit::pki::Authority;
use support::rig::*;

struct Pair {
    app: EchoApp,
    client: Proxy,
    server: Proxy,
}

async fn pair_with(client: ProxySpec<'_>, mut server: ProxySpec<'_>) -> Pair {
    let app = echo_app().await;
    server.inbound_port = app.addr.port();
    let server = start_proxy(server).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    let mut client = client;
    client.outbound_to = server.bound.inbound;
    let client = start_proxy(client).await;
    client
        .mesh
        .set_destination(meshed(server.bound.inbound, API));
    Pair {
        app,
        client,
        server,
    }
}

async fn pair(a: &Authority) -> Pair {
    pair_with(ProxySpec::new(a, WEB), ProxySpec::new(a, API)).await
}

impl Pair {
    async fn call(&self, msg: &[u8]) -> Vec<u8> {
        exchange(self.client.bound.outbound, msg).await
    }
    fn handshakes(&self) -> u64 {
        self.client.metrics.tunnels_opened(Direction::Outbound)
    }
}

#[tokio::test]
async fn app_connections_share_one_handshake_and_policy_is_decided_for_each() {
    let a = Authority::new("mesh");
    let p = pair(&a).await;
    assert_eq!(p.call(b"one").await, b"one");
    assert_eq!(p.call(b"two").await, b"two");
    assert_eq!(
        p.handshakes(),
        1,
        "the second connection rode the first's tunnel"
    );
    assert_eq!(p.server.metrics.tunnels_opened(Direction::Inbound), 1);
    assert_eq!(p.app.connections(), 2);
    assert_eq!(
        p.server
            .metrics
            .decision_count("allow", "default_all_authenticated"),
        2,
        "one decision per app connection"
    );
    // The policy changes: the next app connection on the same tunnel is judged anew.
    p.server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::Deny, vec![])));
    assert!(p.call(b"three").await.is_empty());
    assert_eq!(p.handshakes(), 1, "denied on the same tunnel");
    assert_eq!(p.app.connections(), 2);
    assert_eq!(p.server.metrics.decision_count("deny", "default_deny"), 1);
    assert_eq!(
        p.client
            .metrics
            .refused_count(Direction::Outbound, "denied_by_destination"),
        1
    );
    // Every app connection was counted as one inbound connection, and none is left open.
    assert!(eventually(|| p.server.metrics.active(Direction::Inbound) == 0).await);
}

#[tokio::test]
async fn a_bundle_change_on_the_client_makes_the_next_connection_use_a_new_tunnel() {
    let a = Authority::new("mesh");
    let p = pair(&a).await;
    assert_eq!(p.call(b"one").await, b"one");
    let next = Authority::new("next");
    p.client
        .bundle
        .replace(vec![a.root_der(), next.root_der()])
        .unwrap();
    assert_eq!(p.call(b"two").await, b"two");
    assert_eq!(p.handshakes(), 2);
}

#[tokio::test]
async fn a_bundle_change_on_the_server_refuses_streams_on_the_old_tunnel() {
    let a = Authority::new("mesh");
    let p = pair(&a).await;
    assert_eq!(p.call(b"one").await, b"one");
    let next = Authority::new("next");
    p.server
        .bundle
        .replace(vec![a.root_der(), next.root_der()])
        .unwrap();
    assert_eq!(p.call(b"two").await, b"two", "retried on a fresh tunnel");
    assert_eq!(p.handshakes(), 2);
    assert_eq!(
        p.server
            .metrics
            .refused_count(Direction::Inbound, "tunnel_stale"),
        1
    );
    assert_eq!(p.server.metrics.tunnels_opened(Direction::Inbound), 2);
}

#[tokio::test]
async fn a_renewed_certificate_is_presented_on_a_new_tunnel() {
    let a = Authority::new("mesh");
    let p = pair(&a).await;
    assert_eq!(p.call(b"one").await, b"one");
    let renewed = a.leaf(WEB);
    p.client
        .store
        .install(Installed::from_chain(renewed.chain.clone(), renewed.key()).unwrap());
    assert_eq!(p.call(b"two").await, b"two");
    assert_eq!(p.handshakes(), 2);
}

#[tokio::test]
async fn a_new_identity_for_the_address_gets_a_tunnel_of_its_own_and_is_verified() {
    let a = Authority::new("mesh");
    let p = pair(&a).await;
    assert_eq!(p.call(b"one").await, b"one");
    // The address now belongs to another workload (a pod IP reused): the old tunnel, verified
    // for api, must not carry a connection meant for payments.
    p.client.mesh.set_destination(meshed(
        p.server.bound.inbound,
        "spiffe://cluster.local/ns/shop/sa/payments",
    ));
    assert!(p.call(b"two").await.is_empty());
    assert_eq!(p.app.connections(), 1);
    assert_eq!(
        p.client
            .metrics
            .handshake_failure_count(Direction::Outbound, "wrong_identity"),
        1
    );
}

#[tokio::test]
async fn a_proxy_without_tunnels_still_serves_a_client_with_them() {
    let a = Authority::new("mesh");
    let mut old = ProxySpec::new(&a, API);
    old.limits.tunnels = false;
    let p = pair_with(ProxySpec::new(&a, WEB), old).await;
    assert_eq!(p.call(b"one").await, b"one");
    assert_eq!(p.call(b"two").await, b"two");
    assert_eq!(p.handshakes(), 0, "no tunnel: a TLS connection each");
    assert_eq!(p.server.metrics.tunnels_opened(Direction::Inbound), 0);
    assert_eq!(p.app.connections(), 2);
}

#[tokio::test]
async fn a_client_without_tunnels_uses_a_connection_each() {
    let a = Authority::new("mesh");
    let mut off = ProxySpec::new(&a, WEB);
    off.limits.tunnels = false;
    let p = pair_with(off, ProxySpec::new(&a, API)).await;
    assert_eq!(p.call(b"one").await, b"one");
    assert_eq!(p.call(b"two").await, b"two");
    assert_eq!(p.server.metrics.tunnels_opened(Direction::Inbound), 0);
}

/// Moves tokio's clock, and so an anchored `Clock`, forward by `by` without waiting.
async fn jump(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

#[tokio::test]
async fn a_tunnel_takes_no_new_stream_past_the_own_leafs_expiry() {
    let a = Authority::new("mesh");
    let mut c = ProxySpec::new(&a, WEB);
    c.leaf = Some(a.leaf_between(WEB, -60, 30));
    c.clock = Some(Clock::anchored(SystemTime::now()));
    let p = pair_with(c, ProxySpec::new(&a, API)).await;
    assert_eq!(p.call(b"one").await, b"one");
    jump(Duration::from_secs(40)).await;
    // Past its own notAfter the proxy has no certificate to make a tunnel with, and the old
    // tunnel, which presented the expired one, is not used.
    assert!(p.call(b"two").await.is_empty());
    assert_eq!(p.app.connections(), 1);
    assert_eq!(
        p.client
            .metrics
            .refused_count(Direction::Outbound, "no_certificate"),
        1
    );
}

#[tokio::test]
async fn a_tunnel_takes_no_new_stream_past_the_peer_leafs_expiry() {
    let a = Authority::new("mesh");
    let mut c = ProxySpec::new(&a, WEB);
    c.clock = Some(Clock::anchored(SystemTime::now()));
    let mut s = ProxySpec::new(&a, API);
    s.leaf = Some(a.leaf_between(API, -60, 30));
    let p = pair_with(c, s).await;
    assert_eq!(p.call(b"one").await, b"one");
    jump(Duration::from_secs(40)).await;
    // The client's clock says the server's leaf has expired: the old tunnel is not used, and
    // a new handshake meets the same expired leaf, so the app's connection is closed.
    assert!(p.call(b"two").await.is_empty());
    assert_eq!(p.app.connections(), 1);
    assert_eq!(
        p.handshakes(),
        2,
        "a fresh handshake was tried, not the old tunnel"
    );
}

#[tokio::test]
async fn the_server_refuses_a_stream_from_a_caller_whose_leaf_expired() {
    let a = Authority::new("mesh");
    let mut c = ProxySpec::new(&a, WEB);
    c.leaf = Some(a.leaf_between(WEB, -60, 30));
    let mut s = ProxySpec::new(&a, API);
    s.clock = Some(Clock::anchored(SystemTime::now()));
    let p = pair_with(c, s).await;
    assert_eq!(p.call(b"one").await, b"one");
    jump(Duration::from_secs(40)).await;
    assert!(p.call(b"two").await.is_empty());
    assert_eq!(p.app.connections(), 1);
    assert!(
        p.server
            .metrics
            .refused_count(Direction::Inbound, "tunnel_stale")
            >= 1
    );
}

#[tokio::test]
async fn callers_arriving_together_wait_for_one_handshake() {
    let a = Authority::new("mesh");
    let p = std::sync::Arc::new(pair(&a).await);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.call(b"together").await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), b"together");
    }
    assert_eq!(p.handshakes(), 1);
    assert_eq!(p.app.connections(), 8);
}

#[tokio::test]
async fn a_draining_server_takes_no_new_stream_on_an_open_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Authority::new("mesh");
    let mut s = ProxySpec::new(&a, API);
    s.drain = Duration::from_secs(30);
    let p = pair_with(ProxySpec::new(&a, WEB), s).await;
    // An app connection left open keeps the server draining.
    let mut held = tokio::net::TcpStream::connect(p.client.bound.outbound)
        .await
        .unwrap();
    held.write_all(b"held").await.unwrap();
    let mut back = [0u8; 4];
    held.read_exact(&mut back).await.unwrap();
    p.server.bound.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A draining proxy takes no new connection, be it a stream on a tunnel already open.
    assert!(p.call(b"late").await.is_empty());
    assert_eq!(p.app.connections(), 1);
    drop(held);
    let stopped = tokio::time::timeout(Duration::from_secs(5), p.server.bound.wait()).await;
    assert!(
        stopped.is_ok(),
        "the server proxy did not stop once its last stream ended"
    );
}
