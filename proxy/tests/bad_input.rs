//! Bad input on the inbound port: garbage, a half-finished ClientHello, TLS clients without a
//! certificate, from another root, expired, self-signed. None of them reaches the app.

mod support;

use std::time::Duration;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_proxy::metrics::Direction;
use palisade_testkit::pki::{Authority, self_signed_leaf};
use support::rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server(a: &Authority, default_policy: DefaultPolicy) -> (EchoApp, Proxy) {
    let app = echo_app().await;
    let mut s = ProxySpec::new(a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(default_policy, vec![])));
    (app, server)
}

fn refused(r: Result<Vec<u8>, std::io::Error>) -> bool {
    r.map(|b| b.is_empty()).unwrap_or(true)
}

#[tokio::test]
async fn garbage_bytes_are_a_plaintext_caller_and_refused() {
    let a = Authority::new("mesh");
    let (app, server) = server(&a, DefaultPolicy::AllAuthenticated).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert!(exchange(server.bound.inbound, &garbage).await.is_empty());
    // A TLS-looking record header with nonsense inside.
    assert!(
        exchange(
            server.bound.inbound,
            &[0x16, 0x03, 0x01, 0x00, 0x08, 1, 0, 0, 9, 9, 9, 9, 9]
        )
        .await
        .is_empty()
    );
    assert_eq!(app.connections(), 0);
    assert_eq!(
        server
            .metrics
            .decision_count("deny", "plaintext_not_allowed"),
        2
    );
}

#[tokio::test]
async fn a_half_finished_client_hello_is_not_waited_for_forever() {
    let a = Authority::new("mesh");
    let (app, server) = server(&a, DefaultPolicy::AllAuthenticated).await;
    // The first bytes of a real mesh ClientHello, then silence.
    let mut hello = Vec::new();
    let mut conn =
        rustls::ClientConnection::new(raw_client(None), "127.0.0.1".try_into().unwrap()).unwrap();
    conn.write_tls(&mut hello).unwrap();
    let mut s = TcpStream::connect(server.bound.inbound).await.unwrap();
    s.write_all(&hello[..40]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the proxy decides after its detection window"
    );
    assert_eq!(app.connections(), 0);
    assert!(
        server
            .metrics
            .render()
            .contains("detection=\"incomplete_client_hello\"")
    );
}

#[tokio::test]
async fn a_tls_client_without_a_certificate_is_refused() {
    let a = Authority::new("mesh");
    let (app, server) = server(&a, DefaultPolicy::All).await;
    assert!(refused(
        tls_exchange(server.bound.inbound, raw_client(None), b"x").await
    ));
    assert_eq!(app.connections(), 0);
    assert!(
        eventually(|| server
            .metrics
            .handshake_failure_count(Direction::Inbound, "no_client_certificate")
            == 1)
        .await
    );
}

#[tokio::test]
async fn a_certificate_from_another_root_is_refused() {
    let a = Authority::new("mesh");
    let other = Authority::new("other");
    let (app, server) = server(&a, DefaultPolicy::All).await;
    assert!(refused(
        tls_exchange(
            server.bound.inbound,
            raw_client(Some(&other.leaf(WEB))),
            b"x"
        )
        .await
    ));
    assert_eq!(app.connections(), 0);
    assert!(
        eventually(|| server
            .metrics
            .handshake_failure_count(Direction::Inbound, "unknown_issuer")
            == 1)
        .await
    );
}

#[tokio::test]
async fn a_self_signed_certificate_claiming_a_mesh_identity_is_refused() {
    let a = Authority::new("mesh");
    let (app, server) = server(&a, DefaultPolicy::All).await;
    let forged = self_signed_leaf(WEB);
    assert!(refused(
        tls_exchange(server.bound.inbound, raw_client(Some(&forged)), b"x").await
    ));
    assert_eq!(app.connections(), 0);
    assert!(
        eventually(|| server
            .metrics
            .handshake_failure_count(Direction::Inbound, "unknown_issuer")
            == 1)
        .await
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let a = Authority::new("mesh");
    let (app, server) = server(&a, DefaultPolicy::All).await;
    let expired = a.leaf_between(WEB, -7200, -60);
    assert!(refused(
        tls_exchange(server.bound.inbound, raw_client(Some(&expired)), b"x").await
    ));
    assert_eq!(app.connections(), 0);
    assert!(
        eventually(|| server
            .metrics
            .handshake_failure_count(Direction::Inbound, "expired")
            == 1)
        .await
    );
}

#[tokio::test]
async fn a_proxy_without_a_certificate_refuses_mesh_callers() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.leaf = None;
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    server
        .mesh
        .set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    assert!(refused(
        tls_exchange(server.bound.inbound, raw_client(Some(&a.leaf(WEB))), b"x").await
    ));
    assert_eq!(app.connections(), 0);
}

#[tokio::test]
async fn without_a_policy_from_the_control_plane_everyone_is_refused() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut s = ProxySpec::new(&a, API);
    s.inbound_port = app.addr.port();
    let server = start_proxy(s).await;
    assert!(refused(
        tls_exchange(server.bound.inbound, raw_client(Some(&a.leaf(WEB))), b"x").await
    ));
    assert_eq!(server.metrics.decision_count("deny", "no_policy_yet"), 1);
    assert_eq!(app.connections(), 0);
}
