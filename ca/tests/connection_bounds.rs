//! Connections that never finish a request cannot exhaust the CA: the API and admin ports cap
//! connections in all and per source (refusing, never waiting), and close a connection that
//! does not finish its TLS handshake, its first request or its headers in time, or stays idle;
//! a long mesh watch is not idle. Every bound that bites shows in `/metrics`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use palisade_ca::config::ConnectionLimits;
use palisade_plumbing::conn_gate::Refusal;
use support::{TestCa, connect_from, raw, tls_config, tls_over};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits (at most `within`) for the server to close `stream`; true if it did.
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

async fn metrics(ca: &TestCa) -> String {
    let mut s = tokio::net::TcpStream::connect(ca.running.admin_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

async fn trust_bundle_ok(ca: &TestCa) -> bool {
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "GET",
        "/v1/trust-bundle",
        &[],
        vec![],
    )
    .await;
    resp.status == 200
}

#[tokio::test]
async fn the_api_port_refuses_connections_past_its_caps_and_keeps_serving() {
    let ca = TestCa::start_with(|c| {
        c.connections = ConnectionLimits {
            max_connections: 7,
            max_connections_per_source: 3,
            // Long enough that an idle connection stays open for the whole test.
            handshake_timeout: Duration::from_secs(120),
            ..ConnectionLimits::default()
        }
    })
    .await;
    let stats = ca.running.ca.metrics.api_connections.clone();
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from("127.0.0.2", ca.addr()).await);
    }
    let over_source = connect_from("127.0.0.2", ca.addr()).await;
    assert!(
        closed_within(over_source, Duration::from_secs(5)).await,
        "a fourth idle connection from one source was kept open"
    );
    assert_eq!(stats.refused_count(Refusal::SourceCap), 1);
    // Other sources are served meanwhile, and may fill the rest.
    assert!(trust_bundle_ok(&ca).await);
    for _ in 0..3 {
        idle.push(connect_from("127.0.0.3", ca.addr()).await);
    }
    idle.push(connect_from("127.0.0.4", ca.addr()).await);
    let over_total = connect_from("127.0.0.5", ca.addr()).await;
    assert!(
        closed_within(over_total, Duration::from_secs(5)).await,
        "a connection past the total cap was kept open"
    );
    assert_eq!(stats.refused_count(Refusal::TotalCap), 1);
    // The accept loop never stopped: a place freed is taken by the next connection.
    idle.pop();
    let mut served = false;
    for _ in 0..50 {
        if raw_from_ok(&ca, "127.0.0.6").await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "no request was served after a place was freed");
    let text = metrics(&ca).await;
    for line in [
        r#"palisade_ca_api_connections_refused_total{reason="source_cap"} 1"#,
        "palisade_ca_api_connections 6",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    drop(idle);
    ca.running.shutdown().await;
}

/// GET /v1/trust-bundle from `source`; false if the connection was refused.
async fn raw_from_ok(ca: &TestCa, source: &str) -> bool {
    let tcp = support::connect_from(source, ca.addr()).await;
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca.roots.clone(), None, &[]));
    let Ok(tls) = connector
        .connect(
            rustls_pki_types::ServerName::try_from(support::CA_NAME).unwrap(),
            tcp,
        )
        .await
    else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = http::Request::get("/v1/trust-bundle")
        .header("host", support::CA_NAME)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    matches!(sender.send_request(req).await, Ok(r) if r.status() == 200)
}

fn short_timeouts() -> ConnectionLimits {
    ConnectionLimits {
        handshake_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        ..ConnectionLimits::default()
    }
}

#[tokio::test]
async fn connections_that_say_nothing_are_closed_in_time() {
    let ca = TestCa::start_with(|c| c.connections = short_timeouts()).await;
    let limits = short_timeouts();
    let stats = ca.running.ca.metrics.api_connections.clone();
    let grace = Duration::from_secs(2);

    // No TLS at all.
    let silent = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    assert!(
        closed_within(silent, limits.handshake_timeout + grace).await,
        "a connection that sent nothing was kept"
    );
    // Half a ClientHello.
    let mut half = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    assert!(
        closed_within(half, limits.handshake_timeout + grace).await,
        "a stalled handshake was kept"
    );
    assert!(stats.closed_count("handshake_timeout") >= 2);

    // TLS done, then nothing: HTTP/1.1, and HTTP/2 (no preface).
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
        let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[alpn])).await;
        assert!(
            closed_within(tls, limits.header_read_timeout + grace).await,
            "{}: a connection that sent no request was kept",
            String::from_utf8_lossy(alpn)
        );
    }
    // Half the headers of a request.
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let mut tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"http/1.1"])).await;
    tls.write_all(b"GET /v1/trust-bundle HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(tls, limits.header_read_timeout + grace).await,
        "a request whose headers never ended was kept"
    );
    assert!(stats.closed_count("header_timeout") >= 3);
    let text = metrics(&ca).await;
    assert!(
        text.contains(r#"palisade_ca_api_connections_closed_total{reason="handshake_timeout"}"#),
        "{text}"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_watch_is_not_idle() {
    let ca = TestCa::start_with(|c| c.connections = short_timeouts()).await;
    let limits = short_timeouts();
    let stats = ca.running.ca.metrics.api_connections.clone();

    // HTTP/2: one request, then nothing.
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"h2"])).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("https://{}/v1/trust-bundle", support::CA_NAME))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let started = Instant::now();
    let ended = tokio::time::timeout(limits.idle_timeout + Duration::from_secs(2), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept");
    assert!(
        started.elapsed() >= limits.idle_timeout - Duration::from_millis(500),
        "closed before the idle timeout"
    );
    assert_eq!(stats.closed_count("idle_timeout"), 1);

    // A mesh watch is a request in flight for as long as it streams.
    let (key, cert) = ca.identity("shop", "web").await;
    let config = tls_config(
        ca.roots.clone(),
        Some((support::chain_ders(&cert), key)),
        &[],
    );
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let tls = tls_over(tcp, config).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/v1/mesh/watch?pod_ip=10.77.0.2")
        .header("host", support::CA_NAME)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a snapshot")
        .expect("a frame")
        .unwrap();
    assert!(first.is_data());
    tokio::time::sleep(limits.idle_timeout + Duration::from_secs(1)).await;
    let next = tokio::time::timeout(Duration::from_millis(300), body.frame()).await;
    assert!(
        next.is_err(),
        "the watch stream ended during its first {:?}: {next:?}",
        limits.idle_timeout + Duration::from_secs(1)
    );
    assert_eq!(
        stats.closed_count("idle_timeout"),
        1,
        "the watch was counted idle"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn the_admin_port_refuses_past_its_caps_and_answers_probes() {
    let ca = TestCa::start_with(|c| {
        c.admin_limits.max_connections = 4;
        c.admin_limits.max_connections_per_source = 2;
    })
    .await;
    let admin: SocketAddr = ca.running.admin_addr;
    let _a = connect_from("127.0.0.2", admin).await;
    let _b = connect_from("127.0.0.2", admin).await;
    let over = connect_from("127.0.0.2", admin).await;
    assert!(
        closed_within(over, Duration::from_secs(5)).await,
        "a third idle admin connection from one source was kept (the accept loop waited?)"
    );
    // A probe from elsewhere is answered at once.
    let text = metrics(&ca).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(r#"palisade_ca_admin_connections_refused_total{reason="source_cap"} 1"#),
        "{text}"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn http2_streams_and_header_lists_are_bounded() {
    let ca = TestCa::start().await;
    let limits = ConnectionLimits::default();
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"h2"])).await;
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // The server's SETTINGS arrive with the first exchange.
    let get = |extra: Option<String>| {
        let mut req = http::Request::get(format!("https://{}/v1/trust-bundle", support::CA_NAME));
        if let Some(v) = extra {
            req = req.header("x-padding", v);
        }
        req.body(()).unwrap()
    };
    let (resp, _) = client.send_request(get(None), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(
        client.current_max_send_streams(),
        limits.h2_max_concurrent_streams as usize,
        "the stream limit the server announced"
    );
    // A header list over the limit is refused, and the connection serves on.
    let big = "a".repeat(limits.h2_max_header_list_size as usize + 1024);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client.send_request(get(Some(big)), true).unwrap();
    match resp.await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client.send_request(get(None), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    ca.running.shutdown().await;
}

/// A connection whose reads and writes stop when told, as a peer that vanished without a FIN.
struct Freezable<S> {
    inner: S,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Freezable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Freezable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_peer_that_stops_answering_pings_is_dropped() {
    let limits = ConnectionLimits {
        h2_keepalive_interval: Duration::from_secs(1),
        h2_keepalive_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let ca = TestCa::start_with(|c| c.connections = limits).await;
    let stats = ca.running.ca.metrics.api_connections.clone();
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"h2"])).await;
    let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Freezable {
        inner: tls,
        frozen: frozen.clone(),
    };
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("https://{}/v1/trust-bundle", support::CA_NAME))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    // Well inside the idle timeout: only the unanswered PING can end it.
    let deadline = Instant::now()
        + limits.h2_keepalive_interval
        + limits.h2_keepalive_timeout
        + Duration::from_secs(3);
    while stats.closed_count("keepalive_timeout") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.closed_count("keepalive_timeout"), 1);
    assert_eq!(stats.closed_count("idle_timeout"), 0);
    drop(client);
    ca.running.shutdown().await;
}
