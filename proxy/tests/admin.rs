//! The admin endpoint, app health checks on the kubelet's behalf, shutdown and drain.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_testkit::pki::Authority;
use support::rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_palisade-proxy");

/// An HTTP app answering every request with `status`.
async fn http_app(status: u16) -> SocketAddr {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn ready_live_identity_and_metrics() {
    let a = Authority::new("mesh");
    let mut spec = ProxySpec::new(&a, API);
    spec.leaf = None;
    let p = start_proxy(spec).await;
    assert_eq!(admin(p.bound.admin, "GET", "/live").await.0, 200);
    let (status, body) = admin(p.bound.admin, "GET", "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("certificate"), "{body}");
    assert_eq!(admin(p.bound.admin, "GET", "/identity").await.0, 503);

    let leaf = a.leaf(API);
    p.store.install(
        palisade_proxy::identity::Installed::from_chain(leaf.chain.clone(), leaf.key()).unwrap(),
    );
    let (status, body) = admin(p.bound.admin, "GET", "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("mesh state"), "{body}");
    p.mesh
        .set_inbound(Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    assert_eq!(admin(p.bound.admin, "GET", "/ready").await.0, 200);

    let (status, body) = admin(p.bound.admin, "GET", "/identity").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_id"], API);
    assert!(v["serial"].as_str().unwrap().len() >= 2);
    assert!(v["not_after"].as_i64().unwrap() > 0);
    let root = palisade_ca_api::cert::sha256_fingerprint(&a.root_der());
    assert_eq!(v["trusted_roots"], serde_json::json!([root]));
    let intermediate = palisade_ca_api::cert::sha256_fingerprint(&leaf.chain[1]);
    assert_eq!(v["issuer_sha256"], intermediate.as_str());

    let (status, body) = admin(p.bound.admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "palisade_connections_active",
        "palisade_certificate_not_after_seconds",
        "palisade_certificate_rotations_total",
        "palisade_certificate_rotation_failures_total",
    ] {
        assert!(body.contains(name), "{name} in {body}");
    }
    assert_eq!(admin(p.bound.admin, "GET", "/nope").await.0, 404);
    assert_eq!(admin(p.bound.admin, "POST", "/ready").await.0, 405);
}

#[tokio::test]
async fn app_health_checks_the_recorded_probes() {
    let a = Authority::new("mesh");
    let ok = http_app(204).await;
    let failing = http_app(500).await;
    let tcp = echo_app().await;
    let closed = TcpListener::bind(loopback0())
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let probes = format!(
        r#"{{"web/livez": {{"httpGet": {{"path": "/healthz", "port": {}}}}},
            "web/readyz": {{"httpGet": {{"path": "/healthz", "port": {}}}}},
            "db/readyz": {{"tcpSocket": {{"port": {}}}}},
            "db/livez": {{"tcpSocket": {{"port": {}}}}}}}"#,
        ok.port(),
        failing.port(),
        tcp.addr.port(),
        closed.port()
    );
    let mut spec = ProxySpec::new(&a, API);
    spec.probes = Box::leak(probes.into_boxed_str());
    let p = start_proxy(spec).await;
    assert_eq!(
        admin(p.bound.admin, "GET", "/app-health/web/livez").await.0,
        200
    );
    assert_eq!(
        admin(p.bound.admin, "GET", "/app-health/web/readyz")
            .await
            .0,
        503
    );
    assert_eq!(
        admin(p.bound.admin, "GET", "/app-health/db/readyz").await.0,
        200
    );
    assert_eq!(
        admin(p.bound.admin, "GET", "/app-health/db/livez").await.0,
        503
    );
    assert_eq!(
        admin(p.bound.admin, "GET", "/app-health/db/startupz")
            .await
            .0,
        404
    );
}

/// The admin endpoint's state over a running proxy's parts, with `shutdown` to observe.
fn admin_state(
    p: &Proxy,
    shutdown: tokio::sync::watch::Sender<bool>,
) -> palisade_proxy::admin::AdminState {
    palisade_proxy::admin::AdminState {
        store: p.store.clone(),
        bundle: p.bundle.clone(),
        mesh: p.mesh.clone(),
        metrics: p.metrics.clone(),
        probes: Default::default(),
        probe_timeout: Duration::from_secs(1),
        draining: Arc::new(Default::default()),
        shutdown,
        remote_metrics: false,
        init_report: String::new(),
    }
}

#[tokio::test]
async fn shutdown_is_for_loopback_callers_only() {
    let a = Authority::new("mesh");
    let p = start_proxy(ProxySpec::new(&a, API)).await;
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let state = admin_state(&p, tx.clone());
    let outsider: SocketAddr = "10.77.0.9:5555".parse().unwrap();
    let r = palisade_proxy::admin::route(&state, outsider, &http::Method::POST, "/shutdown").await;
    assert_eq!(r.status(), 403);
    assert!(!*tx.borrow());
    let r = palisade_proxy::admin::route(
        &state,
        "127.0.0.1:5555".parse().unwrap(),
        &http::Method::POST,
        "/shutdown",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(*tx.borrow());
}

#[tokio::test]
async fn callers_from_outside_the_pod_get_only_what_the_kubelet_needs() {
    let a = Authority::new("mesh");
    let p = start_proxy(ProxySpec::new(&a, API)).await;
    let (tx, _rx) = tokio::sync::watch::channel(false);
    let mut state = admin_state(&p, tx);
    async fn get(state: &palisade_proxy::admin::AdminState, peer: &str, path: &str) -> u16 {
        let peer: SocketAddr = peer.parse().unwrap();
        palisade_proxy::admin::route(state, peer, &http::Method::GET, path)
            .await
            .status()
            .as_u16()
    }
    let kubelet = "10.77.0.1:40000";
    assert_eq!(get(&state, kubelet, "/live").await, 200);
    assert_ne!(get(&state, kubelet, "/ready").await, 403);
    assert_eq!(
        get(&state, kubelet, "/app-health/app/livez").await,
        404,
        "answered, nothing recorded"
    );
    for path in ["/metrics", "/identity"] {
        assert_eq!(get(&state, kubelet, path).await, 403, "{path}");
        assert_eq!(
            get(&state, "[fd00:77::1]:40000", path).await,
            403,
            "{path} over IPv6"
        );
        assert_eq!(
            get(&state, "127.0.0.1:40000", path).await,
            200,
            "{path} from loopback"
        );
        assert_eq!(
            get(&state, "[::ffff:127.0.0.1]:40000", path).await,
            200,
            "{path} from mapped loopback"
        );
    }
    state.remote_metrics = true;
    assert_eq!(
        get(&state, kubelet, "/metrics").await,
        200,
        "a pod that opted in"
    );
    assert_eq!(get(&state, kubelet, "/identity").await, 403);
}

#[tokio::test]
async fn post_shutdown_stops_an_idle_proxy() {
    let a = Authority::new("mesh");
    let p = start_proxy(ProxySpec::new(&a, API)).await;
    assert_eq!(admin(p.bound.admin, "POST", "/shutdown").await.0, 200);
    tokio::time::timeout(Duration::from_secs(5), p.bound.wait())
        .await
        .expect("an idle proxy stops at once");
}

#[tokio::test]
async fn drain_closes_inbound_keeps_outbound_until_the_last_connection() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut spec = ProxySpec::new(&a, WEB);
    spec.outbound_to = app.addr;
    spec.inbound_port = app.addr.port();
    spec.drain = Duration::from_secs(30);
    let p = start_proxy(spec).await;
    p.mesh.set_destination(plain(app.addr));
    p.mesh.set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    let mut held = TcpStream::connect(p.bound.outbound).await.unwrap();
    held.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();

    p.bound.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = admin(p.bound.admin, "GET", "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"));
    // Inbound no longer accepts ...
    assert!(TcpStream::connect(p.bound.inbound).await.is_err());
    // ... outbound still serves the app, old and new connections alike.
    assert_eq!(exchange(p.bound.outbound, b"new").await, b"new");
    held.write_all(b"2").await.unwrap();
    held.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"2");
    // The last connection closes: the proxy stops well before its deadline.
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), p.bound.wait())
        .await
        .expect("the proxy stops once no connection is open");
}

#[tokio::test]
async fn the_drain_deadline_ends_connections_that_stay() {
    let a = Authority::new("mesh");
    let app = echo_app().await;
    let mut spec = ProxySpec::new(&a, WEB);
    spec.outbound_to = app.addr;
    spec.drain = Duration::from_millis(300);
    let p = start_proxy(spec).await;
    p.mesh.set_destination(plain(app.addr));
    let mut held = TcpStream::connect(p.bound.outbound).await.unwrap();
    held.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    p.bound.shutdown();
    tokio::time::timeout(Duration::from_secs(10), p.bound.wait())
        .await
        .expect("the deadline ends the drain");
    let mut rest = Vec::new();
    assert_eq!(held.read_to_end(&mut rest).await.unwrap_or(0), 0);
}

#[tokio::test]
async fn wait_ready_polls_until_ready_or_says_why_not() {
    let a = Authority::new("mesh");
    let p = start_proxy(ProxySpec::new(&a, API)).await;
    let admin_addr = p.bound.admin.to_string();
    let not_ready = tokio::process::Command::new(BIN)
        .args(["wait-ready", "--admin", &admin_addr, "--timeout", "600ms"])
        .output()
        .await
        .unwrap();
    assert!(!not_ready.status.success());
    let err = String::from_utf8_lossy(&not_ready.stderr);
    assert!(err.contains("mesh state"), "{err}");
    p.mesh.set_inbound(Some(policy(DefaultPolicy::All, vec![])));
    let ready = tokio::process::Command::new(BIN)
        .args(["wait-ready", "--admin", &admin_addr, "--timeout", "5s"])
        .output()
        .await
        .unwrap();
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
}

#[tokio::test]
async fn a_flood_of_idle_connections_cannot_starve_the_kubelets_probes() {
    let a = Authority::new("mesh");
    let p = start_proxy(ProxySpec::new(&a, API)).await;
    // 200 connections from one source that never send a request.
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(p.bound.admin).await {
            idle.push(s);
        }
    }
    // The kubelet, from another address, probes 30 times meanwhile: every probe is answered.
    for i in 0..30 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(p.bound.admin).await.unwrap();
        s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap_or_else(|_| panic!("probe {i} got no answer"))
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "probe {i}: {out:?}");
    }
    // The idle ones are gone within the header timeout (1 s) and some slack.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut still_open = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        // Closed: EOF (or a reset) at once. Still open: the read waits.
        if tokio::time::timeout(Duration::from_millis(20), s.read(&mut b))
            .await
            .is_err()
        {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "idle connections outlived the header timeout"
    );
}
