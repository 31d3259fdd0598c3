//! Near its connection cap, the API port closes connections that have been served and sit idle,
//! so that callers still waiting for a place get one: in a renewal storm every proxy keeps its
//! connection pooled after its certificate, and those would otherwise hold every place for the
//! whole idle timeout while the rest are refused. Below the cap an idle connection is kept, and
//! a connection that has not sent its first request is never taken for an idle one.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use palisade_ca::config::ConnectionLimits;
use support::{TestCa, connect_from, tls_config, tls_over};
use tokio::task::JoinHandle;

type Conn = (SendRequest<Empty<Bytes>>, JoinHandle<()>);

async fn h2_from(ca: &TestCa, source: &str) -> Conn {
    let tcp = connect_from(source, ca.addr()).await;
    let tls = tls_over(tcp, tls_config(ca.roots.clone(), None, &[b"h2"])).await;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

async fn get_bundle(conn: &mut Conn) {
    let req = http::Request::get(format!("https://{}/v1/trust-bundle", support::CA_NAME))
        .body(Empty::new())
        .unwrap();
    let resp = conn.0.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    resp.into_body().collect().await.unwrap();
}

fn three_places() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 3,
        // Far longer than the test: any idle connection closed here was closed for the cap.
        idle_timeout: Duration::from_secs(120),
        header_read_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    }
}

async fn ended_within(conn: &mut Conn, within: Duration) -> bool {
    tokio::time::timeout(within, &mut conn.1).await.is_ok()
}

#[tokio::test]
async fn near_the_cap_served_idle_connections_make_room() {
    let ca = TestCa::start_with(|c| c.connections = three_places()).await;
    let stats = ca.running.ca.metrics.api_connections.clone();
    let mut first = h2_from(&ca, "127.0.0.2").await;
    get_bundle(&mut first).await;
    let mut second = h2_from(&ca, "127.0.0.3").await;
    get_bundle(&mut second).await;
    assert!(
        !ended_within(&mut first, Duration::from_millis(500)).await,
        "an idle connection was closed below the cap"
    );
    // The third place taken: the two served, idle connections go; the new one stays.
    let mut third = h2_from(&ca, "127.0.0.4").await;
    assert!(
        ended_within(&mut first, Duration::from_secs(3)).await,
        "a served idle connection held its place at the cap"
    );
    assert!(ended_within(&mut second, Duration::from_secs(3)).await);
    assert_eq!(stats.closed_count("idle_near_cap"), 2);
    get_bundle(&mut third).await;
    // Room for more.
    let mut fourth = h2_from(&ca, "127.0.0.5").await;
    get_bundle(&mut fourth).await;
    drop((third, fourth));
    ca.running.shutdown().await;
}

#[tokio::test]
async fn at_the_cap_a_connection_is_closed_as_soon_as_its_request_ends() {
    let ca = TestCa::start_with(|c| c.connections = three_places()).await;
    let stats = ca.running.ca.metrics.api_connections.clone();
    // Three connections that have not asked anything yet: at the cap, none of them is idle.
    let mut a = h2_from(&ca, "127.0.0.2").await;
    let mut b = h2_from(&ca, "127.0.0.3").await;
    let c = h2_from(&ca, "127.0.0.4").await;
    assert!(!ended_within(&mut b, Duration::from_millis(500)).await);
    get_bundle(&mut a).await;
    assert!(
        ended_within(&mut a, Duration::from_secs(3)).await,
        "a connection served at the cap was kept"
    );
    assert_eq!(stats.closed_count("idle_near_cap"), 1);
    assert!(!ended_within(&mut b, Duration::from_millis(100)).await);
    drop((b, c));
    ca.running.shutdown().await;
}
