//! Issued certificates have the DESIGN.md profile, chain to the root (x509-parser, rustls and the
//! openssl command line agree), and the mesh watch follows the mesh file.

mod support;

use std::process::Command;
use std::time::Duration;

use palisade_ca_api::cert::check_leaf_profile;
use palisade_ca_api::wire::{WatchMessageKind, WatchQuery};
use palisade_testkit::mesh_file::MeshFile;
use rustls_pki_types::UnixTime;
use support::{TestCa, chain_ders, mesh_client};
use x509_parser::prelude::{FromDer, X509Certificate};

#[tokio::test]
async fn leaf_profile_and_chain() {
    let ca = TestCa::start().await;
    let (_key, resp) = ca.identity("shop", "web").await;
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(resp.certificate_chain.len(), 2, "leaf then intermediate");
    let chain = chain_ders(&resp);
    let info = check_leaf_profile(&chain[0]).unwrap();
    assert_eq!(info.spiffe_id.to_string(), resp.spiffe_id);
    assert_eq!(info.serial.len(), 32, "128-bit serial: {}", info.serial);
    let lifetime = info.not_after - info.not_before;
    assert_eq!(
        lifetime.whole_seconds(),
        3600 + 60,
        "notBefore = now - 60s, notAfter = now + 1h"
    );
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let (_, inter) = X509Certificate::from_der(&chain[1]).unwrap();
    assert!(
        leaf.verify_signature(Some(inter.public_key())).is_ok(),
        "leaf is signed by the intermediate"
    );
    assert_eq!(leaf.issuer(), inter.subject());
    assert!(inter.is_ca());
    let id = palisade_ca_api::tls::verify_workload_chain(ca.roots.clone(), &chain, UnixTime::now())
        .unwrap();
    assert_eq!(id.to_string(), resp.spiffe_id);
    let expires = time::OffsetDateTime::parse(
        &resp.expires_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(expires, info.not_after);
    assert_eq!(resp.trust_bundle.len(), 1);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn openssl_verifies_the_chain_for_client_and_server_use() {
    let ca = TestCa::start().await;
    let (_key, resp) = ca.identity("shop", "api").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let untrusted = dir.path().join("intermediate.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&root, resp.trust_bundle.concat()).unwrap();
    std::fs::write(&untrusted, &resp.certificate_chain[1]).unwrap();
    std::fs::write(&leaf, &resp.certificate_chain[0]).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(&untrusted)
            .arg(&leaf)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{purpose}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without the intermediate the leaf does not verify: the chain really is leaf <- intermediate <- root.
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/shop/sa/api"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    ca.running.shutdown().await;
}

#[tokio::test]
async fn the_root_survives_a_restart() {
    let ca = TestCa::start().await;
    let before = ca.client(None).trust_bundle().await.unwrap();
    let TestCa { dir, running, .. } = ca;
    running.shutdown().await;
    let again = TestCa::start_in(dir, |_| {}).await;
    let after = again.client(None).trust_bundle().await.unwrap();
    assert_eq!(before, after);
    again.running.shutdown().await;
}

#[tokio::test]
async fn watch_sends_a_snapshot_then_updates_when_the_mesh_file_changes() {
    let ca = TestCa::start().await;
    let client = mesh_client(&ca, "shop", "api").await;
    let query = WatchQuery {
        pod_ip: Some("10.77.0.3".parse().unwrap()),
        destinations: vec!["10.77.0.2".parse().unwrap(), "10.77.0.9".parse().unwrap()],
        ..Default::default()
    };
    let mut stream = client.watch(&query).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.kind, WatchMessageKind::Snapshot);
    let inbound = first.inbound.unwrap();
    assert_eq!(inbound.workload, "shop/api");
    assert_eq!(inbound.policies[0].name, "shop/api-from-web");
    assert!(first.destinations[0].meshed && !first.destinations[1].meshed);

    // Give 10.77.0.9 to a new workload and drop the policy: both reach this watch.
    let changed = MeshFile::new("all-authenticated")
        .workload("web", "shop", "web", "10.77.0.2")
        .workload("api", "shop", "api", "10.77.0.3")
        .workload("db", "shop", "db", "10.77.0.9");
    std::fs::write(ca.mesh_file(), changed.to_yaml()).unwrap();
    let update = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("update within 2 s")
        .unwrap()
        .unwrap();
    assert_eq!(update.kind, WatchMessageKind::Update);
    assert!(update.version > first.version);
    assert!(update.inbound.unwrap().policies.is_empty());
    assert_eq!(
        update.destinations[1]
            .spiffe_id
            .as_ref()
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/shop/sa/db"
    );

    // A file that does not validate changes nothing, and is counted.
    std::fs::write(ca.mesh_file(), "workloads: [{name: x}]").unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), stream.next())
            .await
            .is_err(),
        "no update for a bad file"
    );
    let metrics = reqwest_metrics(ca.running.admin_addr).await;
    assert!(
        metrics.contains("palisade_ca_mesh_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("palisade_ca_mesh_last_reload_ok 0"),
        "{metrics}"
    );
    assert!(metrics.contains("palisade_ca_watch_streams 1"), "{metrics}");
    assert!(
        metrics.contains("palisade_ca_certificates_issued_total{authenticator=\"local\"} 1"),
        "{metrics}"
    );

    // Shutdown ends the stream.
    ca.running.shutdown().await;
    assert!(matches!(stream.next().await, Ok(None) | Err(_)));
}

async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// Two api replicas behind the Service 10.96.0.10:80 (named target port `http`), and the
/// Service `shop/empty` whose selector picks nothing.
fn services_yaml(replicas: &[(&str, &str, u16)]) -> String {
    let mut y = String::from(
        "defaultPolicy: all-authenticated\nworkloads:\n  - {name: web, namespace: shop, serviceAccount: web, ips: [10.77.0.2], labels: {app: web}}\n",
    );
    for (name, ip, port) in replicas {
        y.push_str(&format!(
            "  - {{name: {name}, namespace: shop, serviceAccount: api, ips: [{ip}], labels: {{app: api}}, ports: {{http: {port}}}}}\n"
        ));
    }
    y.push_str(
        "services:\n  - {name: api, namespace: shop, clusterIPs: [10.96.0.10], selector: {app: api}, ports: [{name: http, port: 80, targetPort: http}]}\n  - {name: empty, namespace: shop, clusterIPs: [10.96.0.11], selector: {app: none}, ports: [{port: 80}]}\n",
    );
    y
}

#[tokio::test]
async fn watch_answers_a_service_address_and_follows_its_endpoints() {
    let ca = TestCa::start().await;
    std::fs::write(
        ca.mesh_file(),
        services_yaml(&[("api-1", "10.77.0.3", 8080), ("api-2", "10.77.0.4", 9090)]),
    )
    .unwrap();
    let client = mesh_client(&ca, "shop", "web").await;
    let query = WatchQuery {
        pod_ip: Some("10.77.0.2".parse().unwrap()),
        destinations: vec!["10.96.0.10".parse().unwrap(), "10.96.0.11".parse().unwrap()],
        ..Default::default()
    };
    // The CA picks the file up within its poll interval.
    let mut first = None;
    for _ in 0..20 {
        let mut stream = client.watch(&query).await.unwrap();
        let m = stream.next().await.unwrap().unwrap();
        if m.destinations[0]
            .service
            .as_ref()
            .is_some_and(|s| s.endpoints.len() == 2)
        {
            first = Some((stream, m));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut stream, first) = first.expect("the Service with two endpoints is served");
    let api = first.destinations[0].service.as_ref().unwrap();
    assert_eq!(api.name, "shop/api");
    assert!(
        !first.destinations[0].meshed,
        "a Service address is not itself a workload"
    );
    let endpoints: Vec<(String, Option<u16>, String)> = api
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.target_port(80),
                e.spiffe_id.as_ref().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            (
                "10.77.0.3".into(),
                Some(8080),
                "spiffe://cluster.local/ns/shop/sa/api".into()
            ),
            (
                "10.77.0.4".into(),
                Some(9090),
                "spiffe://cluster.local/ns/shop/sa/api".into()
            ),
        ]
    );
    let empty = first.destinations[1].service.as_ref().unwrap();
    assert_eq!(
        (empty.name.as_str(), empty.endpoints.len()),
        ("shop/empty", 0)
    );

    // Scale down: api-2 leaves; the watch hears of it within a second (2 s bound: not a
    // speed test, the poll interval is 200 ms).
    std::fs::write(
        ca.mesh_file(),
        services_yaml(&[("api-1", "10.77.0.3", 8080)]),
    )
    .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("update within 2 s")
        .unwrap()
        .unwrap();
    let api = update.destinations[0].service.as_ref().unwrap();
    assert_eq!(api.endpoints.len(), 1);
    assert_eq!(api.endpoints[0].address.to_string(), "10.77.0.3");

    // A bad services entry changes nothing: the last good state stays.
    std::fs::write(
        ca.mesh_file(),
        services_yaml(&[("api-1", "10.77.0.3", 8080)]).replace("targetPort: http", "targetPort: 0"),
    )
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), stream.next())
            .await
            .is_err(),
        "no update for a bad file"
    );
}

#[tokio::test]
async fn a_watch_is_only_for_a_pod_address_the_callers_identity_holds() {
    let ca = TestCa::start().await;
    // shop/web asks for the policy of an address no workload holds.
    let client = mesh_client(&ca, "shop", "web").await;
    let nobody = WatchQuery {
        pod_ip: Some("10.77.0.99".parse().unwrap()),
        destinations: vec![],
        ..Default::default()
    };
    match client.watch(&nobody).await {
        Err(palisade_ca_api::client::ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 403);
            assert!(
                message.contains(
                    "no workload of spiffe://cluster.local/ns/shop/sa/web holds pod_ip 10.77.0.99"
                ),
                "{message}"
            );
        }
        Ok(_) => panic!("a watch for an address nobody holds was opened"),
        Err(other) => panic!("{other}"),
    }

    // shop/api watches its own address; then the address goes to another identity: the stream
    // ends rather than stream that workload's policy.
    let api = mesh_client(&ca, "shop", "api").await;
    let own = WatchQuery {
        pod_ip: Some("10.77.0.3".parse().unwrap()),
        destinations: vec![],
        ..Default::default()
    };
    let mut stream = api.watch(&own).await.unwrap();
    assert!(stream.next().await.unwrap().unwrap().inbound.is_some());
    let taken = MeshFile::new("all-authenticated")
        .workload("web", "shop", "web", "10.77.0.2")
        .workload("db", "shop", "db", "10.77.0.3");
    std::fs::write(ca.mesh_file(), taken.to_yaml()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("the stream ends within the reload interval");
    assert!(
        matches!(ended, Ok(None) | Err(_)),
        "the stream went on: {ended:?}"
    );
}

#[tokio::test]
async fn a_watch_ends_when_the_certificate_that_opened_it_expires() {
    let ca = TestCa::start_with(|c| {
        c.allow_short_ttl_for_testing = true;
        c.cert_ttl = Duration::from_secs(3);
    })
    .await;
    let client = mesh_client(&ca, "shop", "api").await;
    let query = WatchQuery {
        pod_ip: Some("10.77.0.3".parse().unwrap()),
        destinations: vec![],
        ..Default::default()
    };
    let mut stream = client.watch(&query).await.unwrap();
    assert!(stream.next().await.unwrap().is_some());
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ends when the certificate expires (3 s), not later");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
}

#[tokio::test]
async fn a_longer_lifetime_than_the_ca_allows_is_cut_to_its_cap() {
    let ca = TestCa::start_with(|c| c.max_cert_ttl = Duration::from_secs(2 * 3600)).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let resp = ca
        .client(None)
        .request_certificate(
            &ca.token("shop", "web"),
            &palisade_ca_api::wire::CertificateRequest {
                csr: palisade_testkit::pki::csr_pem(&key, vec![]),
                ttl_seconds: Some(20 * 3600),
            },
        )
        .await
        .expect("issued, cut to the cap");
    let (_, not_before, not_after) =
        palisade_ca_api::cert::serial_and_validity(&chain_ders(&resp)[0]).unwrap();
    let lifetime = not_after - not_before;
    assert!(
        lifetime <= time::Duration::hours(2) + time::Duration::minutes(2),
        "asked 20h under a 2h cap, got {lifetime}"
    );
    assert!(lifetime >= time::Duration::hours(2), "{lifetime}");
    let mut bad = palisade_ca::config::ServeConfig::embedded("/tmp/x".into(), "/tmp/m".into());
    bad.max_cert_ttl = Duration::from_secs(600);
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("--max-cert-ttl") && err.contains("--cert-ttl"),
        "{err}"
    );
}
