//! The inbound side of tunnels against callers that are not a Palisade proxy: a raw HTTP/2
//! client with a valid mesh certificate, asking for what a proxy would never ask.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use palisade_ca_api::policy::DefaultPolicy;
use palisade_proxy::metrics::Direction;
use palisade_testkit::pki::{Authority, Leaf};
use support::rig::*;
use tokio::net::TcpStream;

/// A tunnel to `addr` presenting `leaf`, ALPN `palisade-tunnel/1`.
async fn raw_tunnel(addr: SocketAddr, leaf: &Leaf) -> h2::client::SendRequest<Bytes> {
    raw_tunnel_and_connection(addr, leaf).await.0
}

/// A tunnel as [`raw_tunnel`], and the task driving its connection, which ends when the
/// connection does.
async fn raw_tunnel_and_connection(
    addr: SocketAddr,
    leaf: &Leaf,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let mut config = (*raw_client(Some(leaf))).clone();
    config.alpn_protocols = vec![palisade_ca_api::tls::MESH_TUNNEL_ALPN.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

type Opened = (http::StatusCode, h2::SendStream<Bytes>, h2::RecvStream);

async fn open(
    send: &h2::client::SendRequest<Bytes>,
    method: http::Method,
    uri: &str,
) -> Result<Opened, h2::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await?;
    let (response, stream) = send.send_request(req, false)?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer within 5 s")?;
    let status = response.status();
    Ok((status, stream, response.into_body()))
}

/// Sends `msg` and END_STREAM, returns everything that comes back.
async fn echo(mut opened: Opened, msg: &'static [u8]) -> Vec<u8> {
    opened.1.send_data(Bytes::from_static(msg), true).unwrap();
    let mut back = Vec::new();
    while let Some(chunk) = opened.2.data().await {
        let chunk = chunk.unwrap();
        opened
            .2
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        back.extend_from_slice(&chunk);
    }
    back
}

async fn server(a: &Authority, tweak: impl FnOnce(&mut ProxySpec<'_>)) -> (Proxy, EchoApp) {
    let app = echo_app().await;
    let mut s = ProxySpec::new(a, API);
    s.inbound_port = app.addr.port();
    tweak(&mut s);
    let server = start_proxy(s).await;
    server.mesh.set_inbound(Some(policy(
        DefaultPolicy::Deny,
        vec![resolved(
            "shop/api-from-web",
            r#"[{"serviceAccounts": ["shop/web"]}]"#,
            false,
        )],
    )));
    (server, app)
}

#[tokio::test]
async fn only_the_port_of_an_authority_is_taken_and_other_requests_are_bad() {
    let a = Authority::new("mesh");
    let (server, app) = server(&a, |_| {}).await;
    let tunnel = raw_tunnel(server.bound.inbound, &a.leaf(WEB)).await;
    // Another address in the authority: the stream still goes to this pod's app.
    let opened = open(&tunnel, http::Method::CONNECT, "10.99.99.99:4444")
        .await
        .unwrap();
    assert_eq!(opened.0, http::StatusCode::OK);
    assert_eq!(echo(opened, b"hello").await, b"hello");
    assert_eq!(app.connections(), 1);
    let (status, _, _) = open(&tunnel, http::Method::GET, "http://127.0.0.1:80/")
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::BAD_REQUEST);
    assert_eq!(
        server
            .metrics
            .refused_count(Direction::Inbound, "bad_tunnel_request"),
        1
    );
    assert_eq!(app.connections(), 1);
}

#[tokio::test]
async fn each_stream_is_judged_with_the_tunnels_identity() {
    let a = Authority::new("mesh");
    let (server, app) = server(&a, |_| {}).await;
    let evil = raw_tunnel(server.bound.inbound, &a.leaf(EVIL)).await;
    let (status, _, _) = open(&evil, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::FORBIDDEN);
    let web = raw_tunnel(server.bound.inbound, &a.leaf(WEB)).await;
    let opened = open(&web, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    assert_eq!(opened.0, http::StatusCode::OK);
    assert_eq!(app.connections(), 1);
    assert_eq!(server.metrics.decision_count("deny", "no_rule_matched"), 1);
    assert_eq!(server.metrics.decision_count("allow", "rule_matched"), 1);
}

#[tokio::test]
async fn streams_past_the_per_source_cap_are_refused() {
    let a = Authority::new("mesh");
    // The tunnel's own connection holds one slot, each stream another.
    let (server, app) = server(&a, |s| s.limits.max_connections_per_source = 3).await;
    let tunnel = raw_tunnel(server.bound.inbound, &a.leaf(WEB)).await;
    let first = open(&tunnel, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    let second = open(&tunnel, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    assert_eq!(
        (first.0, second.0),
        (http::StatusCode::OK, http::StatusCode::OK)
    );
    let third = open(&tunnel, http::Method::CONNECT, "127.0.0.1:80").await;
    let err = third.expect_err("the third stream is refused");
    assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM), "{err}");
    assert_eq!(
        server
            .metrics
            .refused_count(Direction::Inbound, "source_connection_limit"),
        1
    );
    // A stream that ends gives its slot back.
    assert_eq!(echo(first, b"bye").await, b"bye");
    assert!(eventually(|| server.metrics.active(Direction::Inbound) == 1).await);
    let fourth = open(&tunnel, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    assert_eq!(fourth.0, http::StatusCode::OK);
    assert_eq!(app.connections(), 3);
}

#[tokio::test]
async fn a_tunnel_left_without_streams_is_closed() {
    let a = Authority::new("mesh");
    let (server, _app) = server(&a, |s| {
        s.limits.tunnel_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (tunnel, connection) = raw_tunnel_and_connection(server.bound.inbound, &a.leaf(WEB)).await;
    let opened = open(&tunnel, http::Method::CONNECT, "127.0.0.1:80")
        .await
        .unwrap();
    assert_eq!(echo(opened, b"once").await, b"once");
    // The caller keeps the tunnel but sends nothing more: the server closes it, so an empty
    // tunnel cannot hold a connection slot for ever.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        ended.is_ok(),
        "the server kept a tunnel without streams open"
    );
    assert!(eventually(|| server.metrics.active(Direction::Inbound) == 0).await);
}
