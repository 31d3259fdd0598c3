//! TLS handshakes take turns: at most `max_concurrent_handshakes` are in progress, the rest wait
//! first come first served, so that a renewal storm's connections are handshaken at the rate the
//! CPU allows instead of all at once (each then too slow for the handshake timeout). A turn covers
//! the server's CPU step only, from the whole ClientHello to the server's first write, so a peer
//! that never authenticates cannot hold one: not by sending nothing or half a ClientHello, nor by
//! going silent after it. (The queue's own bound is tested in `server::handshakes`.)

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use palisade_ca::config::ConnectionLimits;
use rustls::pki_types::ServerName;
use support::{TestCa, connect_from, tls_config, tls_over};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The first bytes of a ClientHello and no more: a handshake that has begun and stalls.
const HALF_HELLO: [u8; 5] = [0x16, 0x03, 0x01, 0x02, 0x00];

async fn stalled_handshake(ca: &TestCa, source: &str) -> TcpStream {
    let mut tcp = connect_from(source, ca.addr()).await;
    tcp.write_all(&HALF_HELLO).await.unwrap();
    tcp
}

/// A well-behaved client: TLS, HTTP/2, `GET /v1/trust-bundle`; how long it took.
async fn served_in(ca: &TestCa, source: &str) -> Duration {
    let start = Instant::now();
    let tcp = connect_from(source, ca.addr()).await;
    let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"h2"])).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("https://{}/v1/trust-bundle", support::CA_NAME))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let took = start.elapsed();
    conn.abort();
    took
}

/// A whole ClientHello, sent; then nothing, ever.
async fn silent_after_client_hello(ca: &TestCa, source: &str) -> TcpStream {
    let config = tls_config(ca.roots.clone(), None, &[b"h2"]);
    let name = ServerName::try_from(support::CA_NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let mut tcp = connect_from(source, ca.addr()).await;
    tcp.write_all(&hello).await.unwrap();
    tcp
}

fn limits(turns: usize, handshake: u64, queue: u64) -> ConnectionLimits {
    ConnectionLimits {
        max_concurrent_handshakes: turns,
        handshake_timeout: Duration::from_secs(handshake),
        header_read_timeout: Duration::from_secs(queue),
        ..ConnectionLimits::default()
    }
}

#[tokio::test]
async fn peers_that_never_finish_their_client_hello_take_no_turn() {
    // One turn, and timeouts far longer than the test.
    let ca = TestCa::start_with(|c| c.connections = limits(1, 60, 60)).await;
    let mut idle = Vec::new();
    for i in 2..4 {
        idle.push(connect_from(&format!("127.0.0.{i}"), ca.addr()).await);
    }
    for i in 4..6 {
        idle.push(stalled_handshake(&ca, &format!("127.0.0.{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = served_in(&ca, "127.0.0.10").await;
    assert!(
        took < Duration::from_secs(3),
        "peers that sent nothing or half a ClientHello kept a client waiting {took:?}"
    );
    drop(idle);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn peers_silent_after_their_client_hello_give_their_turns_back() {
    let ca = TestCa::start_with(|c| c.connections = limits(1, 60, 60)).await;
    let mut silent = Vec::new();
    for i in 2..5 {
        silent.push(silent_after_client_hello(&ca, &format!("127.0.0.{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = served_in(&ca, "127.0.0.10").await;
    assert!(
        took < Duration::from_secs(3),
        "peers that stopped after their ClientHello kept a client waiting {took:?}"
    );
    drop(silent);
    ca.running.shutdown().await;
}
