//! Every bad input of the certificate API and the mesh watch gets its documented JSON error.

mod support;

use palisade_ca_api::wire::CertificateRequest;
use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::pki::{csr_pem, spiffe_san};
use support::post_certificate as post;
use support::{TestCa, chain_ders, raw};

fn body(csr: &str) -> Vec<u8> {
    serde_json::to_vec(&CertificateRequest {
        csr: csr.into(),
        ttl_seconds: None,
    })
    .unwrap()
}

async fn expect(
    ca: &TestCa,
    token: Option<&str>,
    body: Vec<u8>,
    status: u16,
    code: &str,
) -> String {
    let resp = post(ca, token, body).await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (status, code),
        "{}",
        resp.body
    );
    resp.body
}

#[tokio::test]
async fn token_problems_are_401_with_their_code() {
    let ca = TestCa::start().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let good = body(&csr_pem(&key, vec![]));
    let msg = expect(&ca, None, good.clone(), 401, "missing_token").await;
    assert!(msg.contains("Authorization: Bearer"), "{msg}");
    expect(&ca, Some("garbage"), good.clone(), 401, "invalid_token").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = ca
        .issuer
        .mint_with_times("shop", "web", None, "palisade-ca", now - 7200, now - 3600)
        .unwrap();
    expect(&ca, Some(&expired), good.clone(), 401, "expired_token").await;
    let wrong_aud = ca
        .issuer
        .mint(
            "shop",
            "web",
            None,
            "kubernetes",
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    let msg = expect(&ca, Some(&wrong_aud), good.clone(), 401, "wrong_audience").await;
    assert!(msg.contains("palisade-ca"), "{msg}");
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger =
        palisade_ca::auth::local::LocalIssuer::load_or_create(stranger_dir.path()).unwrap();
    let foreign = stranger
        .mint(
            "shop",
            "web",
            None,
            "palisade-ca",
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    expect(&ca, Some(&foreign), good.clone(), 401, "invalid_token").await;
    // And the good token works, so the refusals above are about the tokens.
    let resp = post(&ca, Some(&ca.token("shop", "web")), good).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    ca.running.shutdown().await;
}

#[tokio::test]
async fn csr_problems_are_refused_with_their_code() {
    let ca = TestCa::start().await;
    let token = ca.token("shop", "web");
    let key = rcgen::KeyPair::generate().unwrap();
    // Signed by a different key: swap in another public key.
    let other = rcgen::KeyPair::generate().unwrap();
    let der = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let mut forged = der.clone();
    let at = forged
        .windows(65)
        .position(|w| w == key.public_key_raw())
        .unwrap();
    forged[at..at + 65].copy_from_slice(other.public_key_raw());
    let forged_pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64_lines(&forged)
    );
    expect(&ca, Some(&token), body(&forged_pem), 400, "invalid_csr").await;
    let msg = expect(
        &ca,
        Some(&token),
        body(&csr_pem(
            &key,
            vec![spiffe_san("spiffe://cluster.local/ns/shop/sa/api")],
        )),
        403,
        "identity_mismatch",
    )
    .await;
    assert!(
        msg.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{msg}"
    );
    let dns = rcgen::SanType::DnsName("api.shop.svc".try_into().unwrap());
    expect(
        &ca,
        Some(&token),
        body(&csr_pem(&key, vec![dns])),
        400,
        "forbidden_csr_content",
    )
    .await;
    let ip = rcgen::SanType::IpAddress("10.77.0.2".parse().unwrap());
    expect(
        &ca,
        Some(&token),
        body(&csr_pem(&key, vec![ip])),
        400,
        "forbidden_csr_content",
    )
    .await;
    expect(
        &ca,
        Some(&token),
        body("this is not a CSR"),
        400,
        "invalid_csr",
    )
    .await;
    let req = serde_json::to_vec(&CertificateRequest {
        csr: csr_pem(&key, vec![]),
        ttl_seconds: Some(60),
    })
    .unwrap();
    expect(&ca, Some(&token), req, 400, "invalid_ttl").await;
    ca.running.shutdown().await;
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    b.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn body_problems_are_400_and_413() {
    let ca = TestCa::start().await;
    let token = ca.token("shop", "web");
    expect(
        &ca,
        Some(&token),
        b"{not json".to_vec(),
        400,
        "malformed_request",
    )
    .await;
    expect(
        &ca,
        Some(&token),
        br#"{"csr": 5}"#.to_vec(),
        400,
        "malformed_request",
    )
    .await;
    let huge = format!(r#"{{"csr": "{}"}}"#, "A".repeat(100 * 1024)).into_bytes();
    expect(&ca, Some(&token), huge, 413, "body_too_large").await;
    ca.running.shutdown().await;
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_json_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::start().await;
    let mut tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    tcp.write_all(b"GET /v1/trust-bundle HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains(r#""code":"tls_required""#) && out.contains("https://"),
        "{out}"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn watch_needs_a_mesh_client_certificate_of_this_trust_domain() {
    let ca = TestCa::start().await;
    let path = "/v1/mesh/watch?pod_ip=10.77.0.2";
    let resp = raw(ca.addr(), ca.roots.clone(), None, "GET", path, &[], vec![]).await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (401, "missing_client_certificate"),
        "{}",
        resp.body
    );

    // A certificate from another CA, of another trust domain.
    let other_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        other_dir.path().join("mesh.yaml"),
        MeshFile::web_and_api()
            .trust_domain("other.domain")
            .to_yaml(),
    )
    .unwrap();
    let other = TestCa::start_in(other_dir, |c| c.trust_domain = "other.domain".into()).await;
    let (key, cert) = other.identity("shop", "web").await;
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        Some((chain_ders(&cert), key)),
        "GET",
        path,
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (401, "untrusted_client_certificate"),
        "{}",
        resp.body
    );
    assert!(resp.body.contains("cluster.local"), "{}", resp.body);

    // Our own identity asking for another workload's pod.
    let (key, cert) = ca.identity("shop", "web").await;
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        Some((chain_ders(&cert), key)),
        "GET",
        "/v1/mesh/watch?pod_ip=10.77.0.3",
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (403, "identity_mismatch"),
        "{}",
        resp.body
    );
    let (key, cert) = ca.identity("shop", "web").await;
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        Some((chain_ders(&cert), key)),
        "GET",
        "/v1/mesh/watch?everything=1",
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (400, "invalid_watch_query"),
        "{}",
        resp.body
    );
    other.running.shutdown().await;
    ca.running.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let ca = TestCa::start().await;
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "GET",
        "/v1/nothing",
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (404, "not_found")
    );
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "GET",
        "/v1/certificates",
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (405, "method_not_allowed")
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn rate_limit_per_identity_answers_429() {
    let ca = TestCa::start_with(|c| {
        c.rate_limit_per_identity = 1;
        c.rate_limit_burst = 2;
    })
    .await;
    let key = rcgen::KeyPair::generate().unwrap();
    let token = ca.token("shop", "web");
    for _ in 0..2 {
        assert_eq!(
            post(&ca, Some(&token), body(&csr_pem(&key, vec![])))
                .await
                .status,
            200
        );
    }
    expect(
        &ca,
        Some(&token),
        body(&csr_pem(&key, vec![])),
        429,
        "rate_limited",
    )
    .await;
    // Another identity is not affected.
    assert_eq!(
        post(
            &ca,
            Some(&ca.token("shop", "api")),
            body(&csr_pem(&key, vec![]))
        )
        .await
        .status,
        200
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_trusted_root_of_another_trust_domain_still_gives_no_watch() {
    // The other domain's root is in our bundle (e.g. during a federation mistake): its
    // certificates chain, so only the trust-domain check can refuse them.
    let other_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        other_dir.path().join("mesh.yaml"),
        MeshFile::web_and_api()
            .trust_domain("other.domain")
            .to_yaml(),
    )
    .unwrap();
    let other = TestCa::start_in(other_dir, |c| c.trust_domain = "other.domain".into()).await;
    let roots_file = other.dir.path().join("other-roots.pem");
    std::fs::write(
        &roots_file,
        other
            .running
            .ca
            .rotation
            .authority()
            .trust_bundle_pem()
            .concat(),
    )
    .unwrap();
    let ca = TestCa::start_with(|c| c.extra_trust_roots = Some(roots_file.clone())).await;
    assert_eq!(
        ca.running.ca.rotation.authority().trust_bundle_pem().len(),
        2
    );
    let (key, cert) = other.identity("shop", "web").await;
    let resp = raw(
        ca.addr(),
        ca.roots.clone(),
        Some((chain_ders(&cert), key)),
        "GET",
        "/v1/mesh/watch?destination=10.77.0.2",
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (401, "untrusted_client_certificate"),
        "{}",
        resp.body
    );
    assert!(resp.body.contains("other.domain"), "{}", resp.body);
    other.running.shutdown().await;
    ca.running.shutdown().await;
}
