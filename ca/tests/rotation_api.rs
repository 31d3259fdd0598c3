//! A root rotation on a running CA, driven the way an operator and a proxy drive it: `POST
//! /rotation/root` on the admin port, the mesh watch carrying the two-root bundle and then the
//! request to renew, confirmations through `root=`, a leaf renewed from the new intermediate,
//! and at the end a leaf of the old root refused, the audit lines and the metrics.

mod support;

use std::sync::Arc;
use std::time::Duration;

use palisade_ca::rotation::RotationStatus;
use palisade_ca::rotation::cli as rotation_cli;
use palisade_ca_api::cert::{parse_pem_certs, sha256_fingerprint};
use palisade_ca_api::client::{CaClient, CaClientConfig, ClientError, WatchStream};
use palisade_ca_api::wire::{CertificateRequest, ErrorCode, WatchMessage, WatchQuery};
use palisade_testkit::pki::csr_pem;
use rustls_pki_types::CertificateDer;
use support::{CA_NAME, CertResolver, TestCa};

/// A client of the CA trusting `bundle`, presenting `chain` (with its key) when given.
fn client(
    ca: &TestCa,
    bundle: &[CertificateDer<'static>],
    chain: Option<(Vec<CertificateDer<'static>>, &rcgen::KeyPair)>,
) -> CaClient {
    let client_cert = chain.map(|(chain, key)| {
        let signing = palisade_ca_api::tls::crypto_provider()
            .key_provider
            .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
                key.serialize_der().into(),
            ))
            .unwrap();
        Arc::new(CertResolver(Arc::new(rustls::sign::CertifiedKey::new(
            chain, signing,
        )))) as Arc<dyn rustls::client::ResolvesClientCert>
    });
    CaClient::new(CaClientConfig {
        addr: ca.addr().to_string(),
        server_name: CA_NAME.into(),
        roots: Arc::new(palisade_ca_api::tls::root_store(bundle).unwrap()),
        client_cert,
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

/// A new key and a leaf for shop/api, through a client that trusts `bundle`.
async fn leaf(
    ca: &TestCa,
    bundle: &[CertificateDer<'static>],
) -> (rcgen::KeyPair, Vec<CertificateDer<'static>>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let resp = client(ca, bundle, None)
        .request_certificate(
            &ca.token("shop", "api"),
            &CertificateRequest {
                csr: csr_pem(&key, vec![]),
                ttl_seconds: None,
            },
        )
        .await
        .unwrap();
    let chain = resp
        .certificate_chain
        .iter()
        .flat_map(|p| parse_pem_certs(p).unwrap())
        .collect();
    (key, chain)
}

fn query(roots: &[CertificateDer<'static>]) -> WatchQuery {
    WatchQuery {
        pod_ip: Some("10.77.0.3".parse().unwrap()),
        roots: roots.iter().map(|r| sha256_fingerprint(r)).collect(),
        ..Default::default()
    }
}

async fn next(stream: &mut WatchStream) -> WatchMessage {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch message within 10 s")
        .unwrap()
        .expect("the stream stays open")
}

fn bundle_of(message: &WatchMessage) -> Vec<CertificateDer<'static>> {
    message
        .trust_bundle
        .iter()
        .flat_map(|p| parse_pem_certs(p).unwrap())
        .collect()
}

async fn status(ca: &TestCa) -> RotationStatus {
    let admin = ca.running.admin_addr;
    tokio::task::spawn_blocking(move || rotation_cli::status(admin).unwrap())
        .await
        .unwrap()
}

async fn phase_becomes(ca: &TestCa, phase: &str) -> RotationStatus {
    for _ in 0..100 {
        let s = status(ca).await;
        if s.phase == phase {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never reached {phase}: {:?}", status(ca).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_through_the_admin_port_and_the_mesh_watch() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let audit_path = audit.clone();
    let ca = TestCa::start_in(dir, move |c| {
        c.rotation.settle = time::Duration::ZERO;
        c.rotation.reconnect_grace = time::Duration::ZERO;
        c.audit_file = Some(audit_path);
    })
    .await;
    let old_bundle = ca.running.ca.rotation.authority().roots().to_vec();
    let (old_key, old_chain) = leaf(&ca, &old_bundle).await;
    let proxy = client(&ca, &old_bundle, Some((old_chain.clone(), &old_key)));
    let mut watch = proxy.watch(&query(&old_bundle)).await.unwrap();
    let first = next(&mut watch).await;
    assert_eq!(bundle_of(&first), old_bundle);
    assert!(first.renew.is_none());
    let idle = status(&ca).await;
    assert_eq!(
        (
            idle.phase.as_str(),
            idle.proxies.total,
            idle.proxies.confirmed
        ),
        ("idle", 1, 1)
    );

    let admin = ca.running.admin_addr;
    let started = tokio::task::spawn_blocking(move || rotation_cli::post(admin, "root").unwrap())
        .await
        .unwrap();
    assert_eq!(started.phase, "trusting");
    let two = bundle_of(&next(&mut watch).await);
    assert_eq!(two.len(), 2, "the watch carries old and new root");
    assert_eq!(two[0], old_bundle[0]);
    // The proxy has not confirmed: the rotation waits and names it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = status(&ca).await;
    assert_eq!(waiting.phase, "trusting");
    assert_eq!(waiting.proxies.lagging[0].pod.as_deref(), Some("shop/api"));

    // It confirms by reopening its watch with both roots.
    let confirming = client(&ca, &two, Some((old_chain.clone(), &old_key)));
    let mut watch = confirming.watch(&query(&two)).await.unwrap();
    next(&mut watch).await;
    let issuing = phase_becomes(&ca, "issuing").await;
    let renew = next(&mut watch).await.renew.expect("told to renew");
    assert_eq!(renew.unless_issued_by, issuing.issuing_intermediate);
    assert_eq!(issuing.leaves_on_previous_root, 1);

    // A renewed leaf comes from the new intermediate; the watch with it drains the old one.
    let (new_key, new_chain) = leaf(&ca, &two).await;
    assert_eq!(
        sha256_fingerprint(&new_chain[1]),
        issuing.issuing_intermediate
    );
    let renewed = client(&ca, &two, Some((new_chain.clone(), &new_key)));
    let mut watch = renewed.watch(&query(&two)).await.unwrap();
    let mut last = next(&mut watch).await;
    let done = phase_becomes(&ca, "idle").await;
    let new_root = two.iter().find(|r| **r != old_bundle[0]).unwrap();
    assert_eq!(done.trusted_roots, vec![sha256_fingerprint(new_root)]);
    // The snapshot may already have come after the move; otherwise an update follows.
    if bundle_of(&last).len() != 1 {
        last = next(&mut watch).await;
    }
    assert_eq!(bundle_of(&last), vec![new_root.clone()]);

    // A leaf of the old root is no longer a mesh identity.
    let stale = client(
        &ca,
        std::slice::from_ref(new_root),
        Some((old_chain, &old_key)),
    );
    match stale.watch(&query(&two)).await {
        Err(ClientError::Api { code, .. }) => {
            assert_eq!(code, ErrorCode::UntrustedClientCertificate)
        }
        Err(other) => panic!("expected untrusted_client_certificate, got {other}"),
        Ok(_) => panic!("a leaf of the retired root was accepted"),
    }

    let lines = std::fs::read_to_string(&audit).unwrap();
    let moves: Vec<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["audit"] == "rotation_phase")
        .map(|l| {
            format!(
                "{}>{}",
                l["from"].as_str().unwrap(),
                l["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            "idle>trusting",
            "trusting>issuing",
            "issuing>retiring",
            "retiring>idle"
        ]
    );
    let metrics = ca.running.ca.metrics.render(0);
    for expect in [
        "palisade_ca_rotation_phase{phase=\"idle\"} 1",
        "palisade_ca_rotation_phase{phase=\"issuing\"} 0",
        "palisade_ca_rotation_transitions_total{kind=\"root\",to=\"retiring\"} 1",
        "palisade_ca_rotation_proxies_lagging 0",
        "palisade_ca_root_expiry_timestamp_seconds ",
        "palisade_mesh_expiry_seconds ",
    ] {
        assert!(metrics.contains(expect), "{expect} missing:\n{metrics}");
    }
}

/// Presents whichever certificate was set last.
#[derive(Debug)]
struct Switchable(std::sync::Mutex<Arc<rustls::sign::CertifiedKey>>);

impl rustls::client::ResolvesClientCert for Switchable {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.lock().unwrap().clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &rcgen::KeyPair,
) -> Arc<rustls::sign::CertifiedKey> {
    let signing = palisade_ca_api::tls::crypto_provider()
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
    Arc::new(rustls::sign::CertifiedKey::new(chain, signing))
}

/// A proxy that renews reconnects its watch; the CA must see the new leaf on the new
/// connection, not the one of a TLS session it resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_presents_the_new_leaf_never_a_resumed_sessions() {
    let ca = TestCa::start().await;
    let bundle = ca.running.ca.rotation.authority().roots().to_vec();
    let (first_key, first) = leaf(&ca, &bundle).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (second_key, second) = leaf(&ca, &bundle).await;
    let resolver = Arc::new(Switchable(std::sync::Mutex::new(certified(
        first, &first_key,
    ))));
    let proxy = CaClient::new(CaClientConfig {
        addr: ca.addr().to_string(),
        server_name: CA_NAME.into(),
        roots: Arc::new(palisade_ca_api::tls::root_store(&bundle).unwrap()),
        client_cert: Some(resolver.clone()),
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    let mut watch = proxy.watch(&query(&bundle)).await.unwrap();
    next(&mut watch).await;
    let seen = |s: RotationStatus| s.mesh_expires_at.unwrap();
    let with_first = seen(status(&ca).await);

    *resolver.0.lock().unwrap() = certified(second.clone(), &second_key);
    proxy.reset_connections().await;
    let mut watch = proxy.watch(&query(&bundle)).await.unwrap();
    next(&mut watch).await;
    let with_second = seen(status(&ca).await);
    let second_not_after = palisade_ca_api::cert::serial_and_validity(&second[0])
        .unwrap()
        .2;
    assert_ne!(with_first, with_second, "the CA still sees the first leaf");
    assert_eq!(
        with_second,
        second_not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
}

/// `palisade-ca rotate root --from-cert F --from-key F`: the CA reads the operator's files; a
/// body it cannot use is refused with what to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_to_an_operators_root_through_the_admin_port() {
    let ca = TestCa::start().await;
    let (cert, key) = support::operator_root(ca.dir.path(), "theirs");
    let admin = ca.running.admin_addr;
    let started = tokio::task::spawn_blocking(move || {
        palisade_ca::rotation::cli::admin_request(admin, "POST", "/rotation/intermediate")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(started.0, 202, "{}", started.1);
    let (c, k) = (cert.clone(), key.clone());
    let err = tokio::task::spawn_blocking(move || rotation_cli::post_root_files(admin, &c, &k))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("409") && err.contains("already under way"),
        "{err}"
    );

    let ca = TestCa::start().await;
    let admin = ca.running.admin_addr;
    let theirs =
        sha256_fingerprint(&parse_pem_certs(&std::fs::read_to_string(&cert).unwrap()).unwrap()[0]);
    let status =
        tokio::task::spawn_blocking(move || rotation_cli::post_root_files(admin, &cert, &key))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(status.phase, "trusting");
    assert_eq!(status.trusted_roots[1], theirs);
    let bad = tokio::task::spawn_blocking(move || {
        rotation_cli::admin_request(admin, "POST", "/rotation/abort")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(bad.0, 202, "abandoned while trusting: {}", bad.1);
}

/// One admin request with a JSON `body` to `addr`: the status and the answer.
async fn post_body(
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, answer) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, answer.to_owned())
}

/// `{"from_cert", "from_key"}` and, when given, `"from_chain"`.
fn files_body(
    cert: &std::path::Path,
    key: &std::path::Path,
    chain: Option<&std::path::Path>,
) -> serde_json::Value {
    let mut body = serde_json::json!({"from_cert": cert, "from_key": key});
    if let Some(chain) = chain {
        body["from_chain"] = serde_json::json!(chain);
    }
    body
}

/// `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`: an intermediate of a
/// new offline root starts a root rotation that ends with the CA not holding its root's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_under_an_offline_root_through_the_admin_port() {
    let ca = TestCa::start_with(|c| {
        c.rotation.settle = time::Duration::ZERO;
        c.rotation.reconnect_grace = time::Duration::ZERO;
    })
    .await;
    let admin = ca.running.admin_addr;
    let root = support::operator_root(ca.dir.path(), "offline");
    let (cert, key, chain) = support::operator_intermediate(ca.dir.path(), "theirs", &root);
    let (code, answer) = post_body(
        admin,
        "/rotation/root",
        &files_body(&cert, &key, Some(&chain)),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("from_chain goes with POST /rotation/intermediate"),
        "{answer}"
    );
    let (code, answer) = post_body(
        admin,
        "/rotation/intermediate",
        &files_body(&cert, &key, None),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("needs from_chain"), "{answer}");
    let (code, answer) = post_body(
        admin,
        "/rotation/intermediate",
        &files_body(&cert, &root.1, Some(&chain)),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("does not belong to the certificate"),
        "{answer}"
    );
    assert_eq!(status(&ca).await.phase, "idle");

    let theirs = sha256_fingerprint(
        &parse_pem_certs(&std::fs::read_to_string(&root.0).unwrap()).unwrap()[0],
    );
    let intermediate =
        sha256_fingerprint(&parse_pem_certs(&std::fs::read_to_string(&cert).unwrap()).unwrap()[0]);
    let started = tokio::task::spawn_blocking(move || {
        rotation_cli::post_intermediate_files(admin, &cert, &key, &chain)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (started.phase.as_str(), started.kind.as_deref()),
        ("trusting", Some("root"))
    );
    assert_eq!(started.trusted_roots[1], theirs);
    assert!(started.root_key_held, "the current root still issues");
    let done = phase_becomes(&ca, "idle").await;
    assert_eq!(done.trusted_roots, vec![theirs]);
    assert_eq!(done.issuing_intermediate, intermediate);
    assert!(!done.root_key_held);
    let (code, raw) =
        tokio::task::spawn_blocking(move || rotation_cli::admin_request(admin, "GET", "/rotation"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(code, 200);
    assert!(raw.contains("\"root_key_held\":false"), "{raw}");
}

/// A local address that is not loopback, if this host has one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    ["192.0.2.1:9", "10.255.255.1:9", "8.8.8.8:53"]
        .iter()
        .find_map(|target| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            socket.connect(target).ok()?;
            let ip = socket.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_intermediate_from_a_non_loopback_caller_is_refused() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("skipped: this host has no address besides loopback");
        return;
    };
    let ca = TestCa::start_with(|c| c.admin_listen = "0.0.0.0:0".parse().unwrap()).await;
    let root = support::operator_root(ca.dir.path(), "offline");
    let (cert, key, chain) = support::operator_intermediate(ca.dir.path(), "theirs", &root);
    let outside = std::net::SocketAddr::new(ip, ca.running.admin_addr.port());
    let (code, answer) = post_body(
        outside,
        "/rotation/intermediate",
        &files_body(&cert, &key, Some(&chain)),
    )
    .await;
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("inside the CA's pod"), "{answer}");
    let status = ca.running.ca.rotation.status();
    assert_eq!(
        (status.phase.as_str(), status.root_key_held),
        ("idle", true)
    );
}
