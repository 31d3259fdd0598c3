//! The CA answers the same on HTTP/2 as on HTTP/1.1, and as HTTP says: a body over the limit
//! is a 413 on both, `HEAD` is `GET` without the body, a 405 names the methods the path takes,
//! and a request that has neither a valid token nor a valid body is a 401 (authentication is
//! checked first).

mod support;

use palisade_ca_api::wire::CertificateRequest;
use palisade_testkit::pki::csr_pem;
use support::{RawResponse, TestCa, raw, raw_h2};

fn too_large() -> Vec<u8> {
    format!(r#"{{"csr": "{}"}}"#, "A".repeat(100 * 1024)).into_bytes()
}

fn good_body() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    serde_json::to_vec(&CertificateRequest {
        csr: csr_pem(&key, vec![]),
        ttl_seconds: None,
    })
    .unwrap()
}

fn code(resp: &RawResponse) -> (u16, String) {
    (resp.status, resp.error_code())
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_on_http2_as_on_http1() {
    let ca = TestCa::start().await;
    let auth = format!("Bearer {}", ca.token("shop", "web"));
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let h1 = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "POST",
        "/v1/certificates",
        &headers,
        too_large(),
    )
    .await;
    assert_eq!(code(&h1), (413, "body_too_large".into()), "{}", h1.body);
    let h2 = raw_h2(
        ca.addr(),
        ca.roots.clone(),
        "POST",
        "/v1/certificates",
        &headers,
        too_large(),
    )
    .await
    .expect("an HTTP/2 answer, not a stream error");
    assert_eq!(code(&h2), (413, "body_too_large".into()), "{}", h2.body);
    // The connection-level check (declared length) and the streamed one (no length) agree.
    let no_length = raw_h2_streamed(&ca, &headers, too_large()).await;
    assert_eq!(
        code(&no_length),
        (413, "body_too_large".into()),
        "{}",
        no_length.body
    );
    ca.running.shutdown().await;
}

/// An HTTP/2 request whose body comes in chunks, with no content-length.
async fn raw_h2_streamed(ca: &TestCa, headers: &[(&str, &str)], body: Vec<u8>) -> RawResponse {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    let tls = support::tls_connect(
        ca.addr(),
        support::tls_config(ca.roots.clone(), None, &[b"h2"]),
    )
    .await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = body
        .chunks(8 * 1024)
        .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{}/v1/certificates", support::CA_NAME));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.expect("an HTTP/2 answer");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        resp.into_body().collect(),
    )
    .await
    .expect("the body ends")
    .map(|b| b.to_bytes())
    .unwrap_or_default();
    RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[tokio::test]
async fn head_is_get_without_the_body_on_both_protocols() {
    let ca = TestCa::start().await;
    let get = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "GET",
        "/v1/trust-bundle",
        &[],
        vec![],
    )
    .await;
    assert_eq!(get.status, 200);
    let h1 = raw(
        ca.addr(),
        ca.roots.clone(),
        None,
        "HEAD",
        "/v1/trust-bundle",
        &[],
        vec![],
    )
    .await;
    let h2 = raw_h2(
        ca.addr(),
        ca.roots.clone(),
        "HEAD",
        "/v1/trust-bundle",
        &[],
        vec![],
    )
    .await
    .expect("an HTTP/2 answer to HEAD, not a protocol error");
    for (proto, head) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        assert_eq!(head.status, 200, "{proto}");
        assert_eq!(head.body, "", "{proto}: HEAD has no body");
        assert_eq!(
            head.headers
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some(get.body.len().to_string()),
            "{proto}: the length GET would have"
        );
        assert_eq!(
            head.headers.get("content-type"),
            get.headers.get("content-type")
        );
    }
    // HEAD on a path that takes no GET is refused the same way on both.
    let h2 = raw_h2(
        ca.addr(),
        ca.roots.clone(),
        "HEAD",
        "/v1/certificates",
        &[],
        vec![],
    )
    .await
    .expect("an HTTP/2 answer");
    assert_eq!(h2.status, 405);
    assert_eq!(h2.body, "");
    assert_eq!(h2.headers.get("allow").unwrap(), "POST");
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_405_names_the_methods_the_path_takes() {
    let ca = TestCa::start().await;
    for (method, path, allow) in [
        ("GET", "/v1/certificates", "POST"),
        ("PUT", "/v1/certificates", "POST"),
        ("POST", "/v1/trust-bundle", "GET, HEAD"),
        ("DELETE", "/v1/mesh/watch", "GET"),
    ] {
        let h1 = raw(ca.addr(), ca.roots.clone(), None, method, path, &[], vec![]).await;
        let h2 = raw_h2(ca.addr(), ca.roots.clone(), method, path, &[], vec![])
            .await
            .unwrap();
        for resp in [&h1, &h2] {
            assert_eq!(
                code(resp),
                (405, "method_not_allowed".into()),
                "{method} {path}"
            );
            assert_eq!(
                resp.headers.get("allow").map(|v| v.to_str().unwrap()),
                Some(allow),
                "{method} {path}"
            );
            assert!(resp.body.contains(allow), "{}", resp.body);
        }
    }
    ca.running.shutdown().await;
}

#[tokio::test]
async fn authentication_is_checked_before_the_body() {
    let ca = TestCa::start().await;
    let post = |token: Option<String>, body: Vec<u8>| {
        let ca = &ca;
        async move { support::post_certificate(ca, token.as_deref(), body).await }
    };
    for body in [
        b"{not json".to_vec(),
        br#"{"csr": 5}"#.to_vec(),
        too_large(),
    ] {
        let none = post(None, body.clone()).await;
        assert_eq!(code(&none), (401, "missing_token".into()), "{}", none.body);
        let forged = post(Some("a.b.c".into()), body.clone()).await;
        assert_eq!(
            code(&forged),
            (401, "invalid_token".into()),
            "{}",
            forged.body
        );
    }
    // A valid token with a bad body is the body's error, and a good request still passes.
    let token = ca.token("shop", "web");
    let bad = post(Some(token.clone()), b"{not json".to_vec()).await;
    assert_eq!(
        code(&bad),
        (400, "malformed_request".into()),
        "{}",
        bad.body
    );
    let ok = post(Some(token), good_body()).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    ca.running.shutdown().await;
}

// curl blocks its thread: the CA needs another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_answers() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let ca = TestCa::start().await;
    let bundle = ca.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        ca.running
            .ca
            .rotation
            .authority()
            .trust_bundle_pem()
            .concat(),
    )
    .unwrap();
    let body_file = ca.dir.path().join("big.json");
    std::fs::write(&body_file, too_large()).unwrap();
    let token = ca.token("shop", "web");
    let curl = |args: &[&str]| {
        let resolve = format!("{}:{}:127.0.0.1", support::CA_NAME, ca.addr().port());
        let out = std::process::Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
            .arg(&bundle)
            .args([
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ])
            .args(args)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let url = |path: &str| format!("https://{}:{}{path}", support::CA_NAME, ca.addr().port());
    let auth = format!("Authorization: Bearer {token}");
    let data = format!("@{}", body_file.display());
    let (out, err) = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        &url("/v1/certificates"),
    ]);
    assert_eq!(out, "413 2", "curl: {err}");
    let (out, err) = curl(&["-I", &url("/v1/trust-bundle")]);
    assert_eq!(out, "200 2", "curl: {err}");
    ca.running.shutdown().await;
}
