//! The data path on loopback: client proxy → mTLS → server proxy → app, and everything that
//! must be refused on the way.

mod support;

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_proxy::metrics::Direction;
use palisade_testkit::pki::Authority;
use support::rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Pair {
    app: EchoApp,
    client: Proxy,
    server: Proxy,
}

/// web's proxy (client side) → api's proxy (server side) → echo app.
async fn pair(authority: &Authority, default_policy: DefaultPolicy, expect: &str) -> Pair {
    let app = echo_app().await;
    let mut s = ProxySpec::new(authority, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(default_policy, vec![])));
    let mut c = ProxySpec::new(authority, WEB);
    c.outbound_to = server.bound.inbound;
    let client = start_proxy(c).await;
    client
        .mesh
        .set_destination(meshed(server.bound.inbound, expect));
    Pair {
        app,
        client,
        server,
    }
}

#[tokio::test]
async fn bytes_cross_the_mesh_with_half_close() {
    let a = Authority::new("mesh");
    let p = pair(&a, DefaultPolicy::AllAuthenticated, API).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let back = exchange(p.client.bound.outbound, &big).await;
    assert_eq!(back.len(), big.len());
    assert_eq!(back, big);
    assert_eq!(p.app.connections(), 1);
    assert_eq!(
        p.server
            .metrics
            .decision_count("allow", "default_all_authenticated"),
        1
    );
    assert!(eventually(|| p.server.metrics.active(Direction::Inbound) == 0).await);
    let text = p.client.metrics.render();
    assert!(
        text.contains("palisade_bytes_total{direction=\"outbound\",flow=\"to_upstream\"} 200000"),
        "{text}"
    );
}

#[tokio::test]
async fn a_destination_presenting_another_identity_is_refused_not_downgraded() {
    let a = Authority::new("mesh");
    let p = pair(
        &a,
        DefaultPolicy::All,
        "spiffe://cluster.local/ns/shop/sa/payments",
    )
    .await;
    let back = exchange(p.client.bound.outbound, b"hello").await;
    assert!(back.is_empty());
    assert_eq!(
        p.client
            .metrics
            .handshake_failure_count(Direction::Outbound, "wrong_identity"),
        1
    );
    assert_eq!(p.app.connections(), 0);
}

#[tokio::test]
async fn a_destination_the_control_plane_cannot_speak_for_is_refused() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut c = ProxySpec::new(&a, WEB);
    c.outbound_to = app.addr;
    let client = start_proxy(c).await;
    let back = exchange(client.bound.outbound, b"hello").await;
    assert!(back.is_empty());
    assert_eq!(app.connections(), 0);
    assert_eq!(
        client
            .metrics
            .refused_count(Direction::Outbound, "destination_unknown"),
        1
    );
}

#[tokio::test]
async fn an_unmeshed_destination_gets_plain_tcp() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut c = ProxySpec::new(&a, WEB);
    c.outbound_to = app.addr;
    let client = start_proxy(c).await;
    client.mesh.set_destination(plain(app.addr));
    assert_eq!(exchange(client.bound.outbound, b"plain").await, b"plain");
    assert_eq!(app.connections(), 1);
}

#[tokio::test]
async fn without_a_certificate_a_meshed_destination_is_refused() {
    let a = Authority::new("mesh");
    let p = pair(&a, DefaultPolicy::All, API).await;
    let mut c = ProxySpec::new(&a, WEB);
    c.leaf = None;
    c.outbound_to = p.server.bound.inbound;
    let client = start_proxy(c).await;
    client
        .mesh
        .set_destination(meshed(p.server.bound.inbound, API));
    assert!(exchange(client.bound.outbound, b"x").await.is_empty());
    assert_eq!(
        client
            .metrics
            .refused_count(Direction::Outbound, "no_certificate"),
        1
    );
    assert_eq!(p.app.connections(), 0);
}

#[tokio::test]
async fn policy_denies_a_caller_no_rule_allows() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server.mesh.set_inbound(Some(policy(
        DefaultPolicy::AllAuthenticated,
        vec![resolved(
            "shop/api-from-web",
            r#"[{"serviceAccounts": ["shop/web"]}]"#,
            false,
        )],
    )));
    let allowed = tls_exchange(server.bound.inbound, raw_client(Some(&a.leaf(WEB))), b"hi")
        .await
        .unwrap();
    assert_eq!(allowed, b"hi");
    let denied = tls_exchange(server.bound.inbound, raw_client(Some(&a.leaf(EVIL))), b"hi").await;
    assert!(denied.map(|b| b.is_empty()).unwrap_or(true));
    assert_eq!(app.connections(), 1);
    assert_eq!(server.metrics.decision_count("deny", "no_rule_matched"), 1);
    assert_eq!(server.metrics.decision_count("allow", "rule_matched"), 1);
}

#[tokio::test]
async fn audit_mode_counts_a_would_deny_and_lets_it_through() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server.mesh.set_inbound(Some(policy(
        DefaultPolicy::AllAuthenticated,
        vec![resolved(
            "shop/audit",
            r#"[{"serviceAccounts": ["shop/web"]}]"#,
            true,
        )],
    )));
    let got = tls_exchange(server.bound.inbound, raw_client(Some(&a.leaf(EVIL))), b"hi")
        .await
        .unwrap();
    assert_eq!(got, b"hi");
    assert_eq!(
        server
            .metrics
            .decision_count("audit_deny", "no_rule_matched"),
        1
    );
}

#[tokio::test]
async fn policy_updates_apply_to_the_next_connection() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    let web = raw_client(Some(&a.leaf(WEB)));
    assert_eq!(
        tls_exchange(server.bound.inbound, web.clone(), b"1")
            .await
            .unwrap(),
        b"1"
    );
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::Deny, vec![])));
    let r = tls_exchange(server.bound.inbound, web, b"2").await;
    assert!(r.map(|b| b.is_empty()).unwrap_or(true));
    assert_eq!(server.metrics.decision_count("deny", "default_deny"), 1);
}

#[tokio::test]
async fn plaintext_callers_pass_only_where_policy_allows_unauthenticated() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    assert!(
        exchange(server.bound.inbound, b"GET / HTTP/1.0\r\n\r\n")
            .await
            .is_empty()
    );
    assert_eq!(
        server
            .metrics
            .decision_count("deny", "plaintext_not_allowed"),
        1
    );
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    assert_eq!(
        exchange(server.bound.inbound, b"GET / HTTP/1.0\r\n\r\n").await,
        b"GET / HTTP/1.0\r\n\r\n"
    );
    assert_eq!(app.connections(), 1);
}

#[tokio::test]
async fn a_server_speaks_first_protocol_does_not_stall() {
    let a = Authority::new("mesh");
    let app = greeting_app(b"220 smtp ready\r\n").await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    let mut c = TcpStream::connect(server.bound.inbound).await.unwrap();
    let mut buf = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .expect("the greeting arrives without the client sending anything")
        .unwrap();
    assert_eq!(&buf, b"220 smtp ready\r\n");
    assert!(
        server
            .metrics
            .render()
            .contains("detection=\"no_bytes_in_window\"")
    );
}

#[tokio::test]
async fn new_certificates_serve_new_handshakes_and_open_connections_stay() {
    let a = Authority::new("mesh");
    let p = pair(&a, DefaultPolicy::AllAuthenticated, API).await;
    let mut open = TcpStream::connect(p.client.bound.outbound).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    let old_serial = p.server.store.current().unwrap().serial.clone();
    let next = a.leaf(API);
    p.server.store.install(
        palisade_proxy::identity::Installed::from_chain(next.chain.clone(), next.key()).unwrap(),
    );
    assert_ne!(p.server.store.current().unwrap().serial, old_serial);
    // A new connection handshakes with the new certificate ...
    assert_eq!(exchange(p.client.bound.outbound, b"after").await, b"after");
    // ... and the connection opened before is untouched.
    open.write_all(b"still!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still!");
}

#[tokio::test]
async fn a_new_root_is_trusted_from_the_next_handshake() {
    let a = Authority::new("mesh");
    let next = Authority::new("next");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    let from_next = raw_client(Some(&next.leaf(WEB)));
    assert!(
        tls_exchange(server.bound.inbound, from_next.clone(), b"x")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    );
    server
        .bundle
        .replace(vec![a.root_der(), next.root_der()])
        .unwrap();
    assert_eq!(
        tls_exchange(server.bound.inbound, from_next, b"x")
            .await
            .unwrap(),
        b"x"
    );
}

#[tokio::test]
async fn the_connection_cap_refuses_with_a_count() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut c = ProxySpec::new(&a, WEB);
    c.outbound_to = app.addr;
    c.limits.max_connections = 2;
    let client = start_proxy(c).await;
    client.mesh.set_destination(plain(app.addr));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(client.bound.outbound).await.unwrap();
        s.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    assert!(exchange(client.bound.outbound, b"third").await.is_empty());
    // The cap is the pod's, not each family's: the IPv6 twin of the listener refuses too.
    let twin = SocketAddr::from((Ipv6Addr::LOCALHOST, client.bound.outbound.port()));
    let over_ipv6 = TcpStream::connect(twin).await.is_ok();
    if over_ipv6 {
        assert!(exchange(twin, b"third, over IPv6").await.is_empty());
    }
    assert_eq!(
        client
            .metrics
            .refused_count(Direction::Outbound, "connection_limit"),
        1 + u64::from(over_ipv6) * 2
    );
    drop(held);
    assert!(eventually(|| client.metrics.active(Direction::Outbound) == 0).await);
    assert_eq!(exchange(client.bound.outbound, b"fourth").await, b"fourth");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut c = ProxySpec::new(&a, WEB);
    c.outbound_to = app.addr;
    c.limits.idle_timeout = Duration::from_millis(200);
    let client = start_proxy(c).await;
    client.mesh.set_destination(plain(app.addr));
    let mut s = TcpStream::connect(client.bound.outbound).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the proxy closes an idle connection");
    assert_eq!(n.unwrap_or(0), 0);
}

/// An mTLS server with a valid mesh certificate of `shop/api` that trusts another root for its
/// clients: it refuses the proxy's certificate after the handshake (TLS 1.3).
async fn server_that_distrusts_the_mesh(mesh: &Authority) -> std::net::SocketAddr {
    use std::sync::Arc;
    let provider = palisade_ca_api::tls::crypto_provider();
    let other = Authority::new("other");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(other.root_der()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let leaf = mesh.leaf(API);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain.clone(), leaf.key())
        .unwrap();
    config.alpn_protocols = vec![palisade_ca_api::tls::MESH_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(s).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_destination_that_refuses_our_certificate_is_counted_and_logged() {
    let a = Authority::new("mesh");
    let server = server_that_distrusts_the_mesh(&a).await;
    let mut c = ProxySpec::new(&a, WEB);
    c.outbound_to = server;
    let client = start_proxy(c).await;
    client.mesh.set_destination(meshed(server, API));
    assert!(
        exchange(client.bound.outbound, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_empty()
    );
    assert!(
        eventually(|| client
            .metrics
            .handshake_failure_count(Direction::Outbound, "peer_refused_certificate")
            == 1)
        .await,
        "{}",
        client.metrics.render()
    );
}

#[tokio::test]
async fn one_source_cannot_fill_the_inbound_cap() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    s.limits.max_connections_per_source = 2;
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    // Two stalled ClientHellos from 127.0.0.1: the first byte of a TLS record, then nothing.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.bound.inbound).await.unwrap();
        s.write_all(&[0x16]).await.unwrap();
        stalled.push(s);
    }
    assert!(
        eventually(|| server.metrics.active(Direction::Inbound) == 2).await,
        "both stalled callers are held"
    );
    // A third from the same source is refused at once...
    assert!(exchange(server.bound.inbound, b"third").await.is_empty());
    assert_eq!(
        server
            .metrics
            .refused_count(Direction::Inbound, "source_connection_limit"),
        1
    );
    // ...while another source is served (plaintext admitted by `all`).
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = other.connect(server.bound.inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"GET / HTTP/1.0\r\n\r\n");
    drop(stalled);
    assert!(eventually(|| server.metrics.active(Direction::Inbound) == 0).await);
    assert_eq!(exchange(server.bound.inbound, b"again").await, b"again");
}
