//! The webhook over real sockets: HTTPS on 127.0.0.1:0, the admin port, certificate reload.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use palisade_testkit::pki::Authority;
use serde_json::Value;
use support::{Client, pod_review, serve_config, serving_leaf, tls_connector, write_leaf};

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn injects_over_https_and_counts_every_result() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let files = write_leaf(dir.path(), &serving_leaf(&pki));
    let bound = palisade_injector::start(serve_config(files)).await.unwrap();
    let mut client = Client::connect(bound.webhook_addr, &tls_connector(&pki.root_der())).await;

    let (status, body) = client
        .post(serde_json::to_vec(&pod_review("u-1")).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["response"]["uid"], "u-1");
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");

    // The same connection carries on after errors, as the API server's pool expects.
    let (status, body) = client.post(b"{\"kind\":".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_json");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a JSON AdmissionReview")
    );

    let mut v1beta1 = pod_review("u-2");
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let (status, body) = client.post(serde_json::to_vec(&v1beta1).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("admissionReviewVersions"));

    let mut update = pod_review("u-3");
    update["request"]["operation"] = "UPDATE".into();
    let (status, body) = client.post(serde_json::to_vec(&update).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["response"].get("patch").is_none());

    let (status, _) = client.request("GET", "/mutate", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, body) = client.request("POST", "/validate", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("POST /mutate"));

    assert_eq!(admin_get(bound.admin_addr, "/ready").await.0, 200);
    assert_eq!(admin_get(bound.admin_addr, "/live").await.0, 200);
    let (status, metrics) = admin_get(bound.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "palisade_injector_reviews_total{result=\"injected\",reason=\"injected\"} 1",
        "palisade_injector_reviews_total{result=\"skipped\",reason=\"not_create\"} 1",
        "palisade_injector_reviews_total{result=\"rejected\",reason=\"not_json\"} 1",
        "palisade_injector_reviews_total{result=\"rejected\",reason=\"wrong_api_version\"} 1",
        "palisade_injector_patch_build_seconds_count 1",
        "palisade_injector_review_duration_seconds_count 2",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    bound.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let bound = palisade_injector::start(serve_config(write_leaf(dir.path(), &serving_leaf(&pki))))
        .await
        .unwrap();
    let mut client = Client::connect(bound.webhook_addr, &tls_connector(&pki.root_der())).await;
    let mut review = pod_review("big");
    review["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({"filler": "x".repeat(70 * 1024)});
    let (status, body) = client.post(serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("--max-request-bytes"));
    let (_, metrics) = admin_get(bound.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("reason=\"body_too_large\"} 1"),
        "{metrics}"
    );
    bound.shutdown().await;
}

#[tokio::test]
async fn certificate_is_reloaded_when_the_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let first = serving_leaf(&pki);
    let files = write_leaf(dir.path(), &first);
    let bound = palisade_injector::start(serve_config(files.clone()))
        .await
        .unwrap();
    let connector = tls_connector(&pki.root_der());
    assert_eq!(
        Client::connect(bound.webhook_addr, &connector)
            .await
            .peer_cert,
        first.der()
    );

    // A half-written pair (new certificate, old key) is rejected and the old one keeps serving.
    let second = serving_leaf(&pki);
    support::write_atomically(&files.cert, &second.cert_pem);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        Client::connect(bound.webhook_addr, &connector)
            .await
            .peer_cert,
        first.der()
    );

    support::write_atomically(&files.key, &second.key_pem);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = Client::connect(bound.webhook_addr, &connector)
            .await
            .peer_cert;
        if served == second.der() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = admin_get(bound.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("palisade_injector_tls_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("palisade_injector_tls_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    bound.shutdown().await;
}

#[tokio::test]
async fn start_fails_with_a_message_naming_the_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let files = write_leaf(dir.path(), &serving_leaf(&pki));
    std::fs::write(&files.key, "not a key").unwrap();
    let err = palisade_injector::start(serve_config(files.clone()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("tls.key"), "{err}");

    let missing = palisade_injector::tls::CertFiles {
        cert: dir.path().join("absent.crt"),
        key: files.key,
    };
    let err = palisade_injector::start(serve_config(missing))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent.crt"), "{err}");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_without_waiting_out_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let bound = palisade_injector::start(serve_config(write_leaf(dir.path(), &serving_leaf(&pki))))
        .await
        .unwrap();
    let mut client = Client::connect(bound.webhook_addr, &tls_connector(&pki.root_der())).await;
    let (status, _) = client
        .post(serde_json::to_vec(&pod_review("u")).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    bound.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?} with one idle keep-alive connection",
        started.elapsed()
    );
}

#[tokio::test]
async fn shutdown_lets_the_review_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let bound = palisade_injector::start(serve_config(write_leaf(dir.path(), &serving_leaf(&pki))))
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(bound.webhook_addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tls_connector(&pki.root_der())
        .connect(name, tcp)
        .await
        .unwrap();
    let body = serde_json::to_vec(&pod_review("in-flight")).unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body[..100]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Shutdown starts while the API server is still sending the review.
    let shutdown = tokio::spawn(bound.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(&body[100..]).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"uid\":\"in-flight\""), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes")
        .unwrap();
}

#[tokio::test]
async fn http2_is_negotiated_and_served() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let bound = palisade_injector::start(serve_config(write_leaf(dir.path(), &serving_leaf(&pki))))
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root_der()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(palisade_injector::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(bound.webhook_addr)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("https://localhost/mutate")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&pod_review("h2")).unwrap(),
        )))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["response"]["uid"], "h2");
    assert_eq!(body["response"]["patchType"], "JSONPatch");
    bound.shutdown().await;
}

#[tokio::test]
async fn a_flood_from_one_address_is_refused_at_once_not_queued() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Authority::new("injector test");
    let files = write_leaf(dir.path(), &serving_leaf(&pki));
    let mut config = serve_config(files);
    config.max_connections_per_source = 2;
    let bound = palisade_injector::start(config).await.unwrap();
    // Two connections that never start TLS hold this address's places...
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            tokio::net::TcpStream::connect(bound.webhook_addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third from it is closed at once rather than left waiting.
    let mut third = tokio::net::TcpStream::connect(bound.webhook_addr)
        .await
        .unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut b))
        .await
        .expect("the third connection was left open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let (_, metrics) = admin_get(bound.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(
            "palisade_injector_webhook_connections_refused_total{reason=\"source_cap\"} 1"
        ),
        "{metrics}"
    );
    // Once they go, reviews are served again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = Client::connect(bound.webhook_addr, &tls_connector(&pki.root_der())).await;
    let (status, _) = client
        .post(serde_json::to_vec(&pod_review("u-9")).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
}
