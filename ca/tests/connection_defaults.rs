//! With its default settings, the CA refuses a flood of idle connections from one address and
//! closes a TLS connection that never sends a request.

mod support;

use std::time::Duration;

use support::{TestCa, connect_from, tls_config, tls_over};
use tokio::io::AsyncReadExt;

async fn closed_within<S: tokio::io::AsyncRead + Unpin>(mut stream: S, within: Duration) -> bool {
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

#[tokio::test]
async fn one_address_may_not_hold_more_than_64_connections() {
    let ca = TestCa::start().await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(connect_from("127.0.0.2", ca.addr()).await);
    }
    let over = connect_from("127.0.0.2", ca.addr()).await;
    assert!(
        closed_within(over, Duration::from_secs(2)).await,
        "a 65th idle connection from one address was kept"
    );
    drop(idle);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_tls_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
    let ca = TestCa::start().await;
    // The default header-read timeout, and a generous margin.
    let within = Duration::from_secs(10) + Duration::from_secs(2);
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
        let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[alpn])).await;
        assert!(
            closed_within(tls, within).await,
            "{}: a connection that sent nothing was kept",
            String::from_utf8_lossy(alpn)
        );
    }
    ca.running.shutdown().await;
}
