//! TLS handshakes take turns: at most `max_concurrent_handshakes` are in progress, the rest wait
//! first come first served, so that a renewal storm's connections are handshaken at the rate the
//! CPU allows instead of all at once (each then too slow for the handshake timeout). What a peer
//! that never authenticates can hold stays bounded: a silent one takes no turn, a stalled one
//! holds its turn for at most the handshake timeout, and a connection waits for a turn for at
//! most the header-read timeout from accept.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use palisade_ca::config::ConnectionLimits;
use support::{TestCa, connect_from, tls_config, tls_over};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
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
async fn silent_connections_take_no_turn() {
    // One turn, and a handshake timeout far longer than the test.
    let ca = TestCa::start_with(|c| c.connections = limits(1, 60, 60)).await;
    let mut silent = Vec::new();
    for i in 2..6 {
        silent.push(connect_from(&format!("127.0.0.{i}"), ca.addr()).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = served_in(&ca, "127.0.0.10").await;
    assert!(
        took < Duration::from_secs(3),
        "connections that sent nothing kept a client waiting {took:?}"
    );
    drop(silent);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn stalled_handshakes_hold_their_turns_at_most_the_handshake_timeout() {
    // Two turns, a 1 s handshake timeout, a queue bound far longer than the test.
    let ca = TestCa::start_with(|c| c.connections = limits(2, 1, 60)).await;
    let stats = ca.running.ca.metrics.api_connections.clone();
    let mut stalled = Vec::new();
    for i in 2..6 {
        stalled.push(stalled_handshake(&ca, &format!("127.0.0.{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two stalled handshakes hold the turns, two wait before the client: its turn comes when
    // the second pair has timed out, about 2 s after they arrived.
    let took = served_in(&ca, "127.0.0.10").await;
    assert!(
        took >= Duration::from_millis(1_300),
        "served in {took:?}: more handshakes in progress than turns, or not first come first served"
    );
    assert!(
        took < Duration::from_secs(4),
        "stalled handshakes held their turns for {took:?}"
    );
    for s in &mut stalled {
        assert!(closed_within(s, Duration::from_secs(1)).await);
    }
    assert_eq!(stats.closed_count("handshake_timeout"), 4);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_connection_waits_for_its_turn_at_most_the_header_read_timeout() {
    // One turn, held by a stalled handshake for far longer than the test; a 1 s queue bound.
    let ca = TestCa::start_with(|c| c.connections = limits(1, 60, 1)).await;
    let metrics = ca.running.ca.metrics.clone();
    let mut holder = stalled_handshake(&ca, "127.0.0.2").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut waiting = stalled_handshake(&ca, "127.0.0.3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metrics.api_handshakes_waiting.load(Ordering::Relaxed), 1);
    assert!(
        metrics
            .render(0)
            .contains("palisade_ca_api_handshakes_waiting 1"),
        "{}",
        metrics.render(0)
    );
    assert!(
        closed_within(&mut waiting, Duration::from_secs(2)).await,
        "a connection waited for its turn past the header-read timeout"
    );
    assert_eq!(
        metrics
            .api_connections
            .closed_count("handshake_queue_timeout"),
        1
    );
    assert_eq!(metrics.api_handshakes_waiting.load(Ordering::Relaxed), 0);
    // The holder got its turn in time: the queue bound is not its bound.
    assert!(!closed_within(&mut holder, Duration::from_millis(200)).await);
    drop(holder);
    ca.running.shutdown().await;
}
