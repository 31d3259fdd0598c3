//! Calls to a Service address on loopback: the client proxy balances over the Service's
//! endpoints itself, verifies each meshed endpoint's own identity, retries an endpoint that
//! fails before any byte was sent, and refuses at once when nothing is ready.

mod support;

use std::net::SocketAddr;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_ca_api::wire::{Destination, PortMapping, ServiceAnswer, ServiceEndpoint};
use palisade_testkit::pki::Authority;
use support::rig::*;

/// The Service address the app calls; nothing listens there, as nothing listens on a ClusterIP.
const VIP: &str = "127.0.96.10:80";
const SERVICE: &str = "shop/api";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// An endpoint at `addr` serving Service port 80; meshed when `identity` is given.
fn endpoint(addr: SocketAddr, identity: Option<&str>) -> ServiceEndpoint {
    ServiceEndpoint {
        address: addr.ip(),
        ports: vec![PortMapping {
            port: 80,
            target_port: addr.port(),
        }],
        meshed: identity.is_some(),
        spiffe_id: identity.map(|id| id.parse().unwrap()),
        workload: None,
    }
}

fn service(endpoints: Vec<ServiceEndpoint>) -> Destination {
    Destination {
        service: Some(ServiceAnswer {
            name: SERVICE.into(),
            ports: vec![80],
            total_endpoints: endpoints.len(),
            endpoints,
        }),
        ..Destination::unmeshed(vip().ip())
    }
}

/// A meshed replica: the api's proxy in front of its own echo app.
async fn replica(authority: &Authority) -> (Proxy, EchoApp) {
    let app = echo_app().await;
    let mut s = ProxySpec::new(authority, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    (server, app)
}

async fn client(authority: &Authority, answer: Destination) -> Proxy {
    let mut c = ProxySpec::new(authority, WEB);
    c.outbound_to = vip();
    let client = start_proxy(c).await;
    client.mesh.set_destination(answer);
    client
}

/// A loopback port that refuses connections (bound once, then closed).
async fn refusing_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn new_connections_spread_over_the_meshed_replicas_with_mtls() {
    let a = Authority::new("mesh");
    let (one, app1) = replica(&a).await;
    let (two, app2) = replica(&a).await;
    let c = client(
        &a,
        service(vec![
            endpoint(one.bound.inbound, Some(API)),
            endpoint(two.bound.inbound, Some(API)),
        ]),
    )
    .await;
    for i in 0..40u32 {
        let msg = format!("call {i}");
        assert_eq!(
            exchange(c.bound.outbound, msg.as_bytes()).await,
            msg.as_bytes()
        );
    }
    let (n1, n2) = (app1.connections(), app2.connections());
    assert_eq!(n1 + n2, 40);
    assert!(n1 >= 10 && n2 >= 10, "spread {n1}/{n2}");
    assert_eq!(c.metrics.service_connection_count(SERVICE, "mtls"), 40);
    assert_eq!(c.metrics.service_connection_count(SERVICE, "plaintext"), 0);
    for server in [&one, &two] {
        assert!(
            server
                .metrics
                .decision_count("allow", "default_all_authenticated")
                >= 10
        );
    }
}

#[tokio::test]
async fn a_refusing_endpoint_is_retried_on_another_before_the_app_sees_anything() {
    let a = Authority::new("mesh");
    let (good, app) = replica(&a).await;
    let dead = refusing_port().await;
    let c = client(
        &a,
        service(vec![
            endpoint(dead, Some(API)),
            endpoint(good.bound.inbound, Some(API)),
        ]),
    )
    .await;
    for i in 0..20u32 {
        let msg = format!("call {i}");
        assert_eq!(
            exchange(c.bound.outbound, msg.as_bytes()).await,
            msg.as_bytes(),
            "call {i} failed"
        );
    }
    assert_eq!(app.connections(), 20);
    let text = c.metrics.render();
    assert!(
        text.contains(
            "palisade_service_endpoint_failures_total{dst_service=\"shop/api\",reason=\"connect_refused\"}"
        ),
        "{text}"
    );
    // Once it failed, the dead endpoint is passed over while the good one works.
    assert!(
        text.contains(
            "palisade_balancer_picks_total{dst_service=\"shop/api\",attempt=\"retry\"} 1\n"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn an_endpoint_with_the_wrong_identity_is_never_used() {
    let a = Authority::new("mesh");
    let (impostor, impostor_app) = replica(&a).await;
    let (good, app) = replica(&a).await;
    let c = client(
        &a,
        service(vec![
            // Presents shop/api while the control plane said shop/evil runs there.
            endpoint(impostor.bound.inbound, Some(EVIL)),
            endpoint(good.bound.inbound, Some(API)),
        ]),
    )
    .await;
    for _ in 0..10 {
        assert_eq!(exchange(c.bound.outbound, b"x").await, b"x");
    }
    assert_eq!(app.connections(), 10);
    assert_eq!(impostor_app.connections(), 0);
    assert!(
        c.metrics.handshake_failure_count(
            palisade_proxy::metrics::Direction::Outbound,
            "wrong_identity"
        ) >= 1
    );
}

#[tokio::test]
async fn meshed_and_unmeshed_endpoints_are_each_handled_per_their_own_status() {
    let a = Authority::new("mesh");
    let (one, meshed_app) = replica(&a).await;
    let plain_app = echo_app().await;
    let c = client(
        &a,
        service(vec![
            endpoint(one.bound.inbound, Some(API)),
            endpoint(plain_app.addr, None),
        ]),
    )
    .await;
    for _ in 0..30 {
        assert_eq!(exchange(c.bound.outbound, b"y").await, b"y");
    }
    let (m, p) = (meshed_app.connections(), plain_app.connections());
    assert_eq!(m + p, 30);
    assert!(m >= 5 && p >= 5, "spread {m}/{p}");
    assert_eq!(
        c.metrics.service_connection_count(SERVICE, "mtls"),
        m as u64
    );
    assert_eq!(
        c.metrics.service_connection_count(SERVICE, "plaintext"),
        p as u64,
        "plaintext is never counted as mTLS"
    );
}

#[tokio::test]
async fn a_service_without_ready_endpoints_or_that_port_is_refused_at_once() {
    let a = Authority::new("mesh");
    let c = client(&a, service(vec![])).await;
    let started = std::time::Instant::now();
    assert!(exchange(c.bound.outbound, b"z").await.is_empty());
    // Refused, not left to a timeout (the bound is loose: this is not a speed test).
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(
        c.metrics.service_connection_count(SERVICE, "no_endpoints"),
        1
    );

    let plain_app = echo_app().await;
    let mut other_port = service(vec![endpoint(plain_app.addr, None)]);
    other_port.service.as_mut().unwrap().ports = vec![443];
    other_port.service.as_mut().unwrap().endpoints[0].ports[0].port = 443;
    c.mesh.set_destination(other_port);
    assert!(exchange(c.bound.outbound, b"z").await.is_empty());
    assert_eq!(
        c.metrics.service_connection_count(SERVICE, "unknown_port"),
        1
    );
    assert_eq!(plain_app.connections(), 0);
}

#[tokio::test]
async fn when_every_endpoint_fails_the_app_connection_is_closed_and_counted() {
    let a = Authority::new("mesh");
    let c = client(
        &a,
        service(vec![
            endpoint(refusing_port().await, Some(API)),
            endpoint(refusing_port().await, None),
        ]),
    )
    .await;
    assert!(exchange(c.bound.outbound, b"z").await.is_empty());
    assert_eq!(c.metrics.service_connection_count(SERVICE, "failed"), 1);
}
