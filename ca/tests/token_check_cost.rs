//! What an unauthenticated caller can make the CA spend on its tokens: TokenReviews (`--auth
//! kube`), counted at a scripted API server, and JWKS fetches (`--auth jwks`), counted at a
//! local HTTP server. Forged tokens must cost at most one review each while remembered, none
//! when malformed, few per source, and forged key IDs at most one fetch per interval.

mod kube_support;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{Method, StatusCode};
use kube_support::{fixture_with, json_response, mock_client};
use palisade_ca::config::AuthMode;
use palisade_ca_api::wire::CertificateRequest;
use support::{TestCa, h2_sender, post_h2};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn b64(v: serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A well-formed, unsigned-in-effect service-account JWT: only the API server can tell.
fn forged(header: serde_json::Value, aud: serde_json::Value, exp: i64, n: usize) -> String {
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:shop:web-{n}"),
        "aud": aud,
        "exp": exp,
    });
    format!("{}.{}.c2lnbmF0dXJl", b64(header), b64(claims))
}

fn forged_for_us(n: usize) -> String {
    forged(
        serde_json::json!({"alg": "RS256", "kid": "k1"}),
        serde_json::json!(["palisade-ca"]),
        now() + 600,
        n,
    )
}

fn body() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    serde_json::to_vec(&CertificateRequest {
        csr: palisade_testkit::pki::csr_pem(&key, vec![]),
        ttl_seconds: None,
    })
    .unwrap()
}

/// An API server that refuses every token after a moment's thought, counting the reviews.
fn refusing_api_server(mut handle: kube_support::ApiHandle) -> Arc<AtomicUsize> {
    let reviews = Arc::new(AtomicUsize::new(0));
    let counted = reviews.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            if parts.method != Method::POST || parts.uri.path() != REVIEWS {
                send.send_response(json_response(StatusCode::NOT_FOUND, &serde_json::json!({})));
                continue;
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let seen: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let token = seen["spec"]["token"].as_str().unwrap().to_owned();
            tokio::spawn(async move {
                // An API server takes a moment: requests with the same token overlap.
                tokio::time::sleep(Duration::from_millis(50)).await;
                send.send_response(json_response(
                    StatusCode::CREATED,
                    &fixture_with("tokenreview-unauthenticated.json", &[("TOKEN", &token)]),
                ));
            });
        }
    });
    reviews
}

async fn kube_ca(
    tweak: impl FnOnce(&mut palisade_ca::config::ServeConfig),
) -> (TestCa, Arc<AtomicUsize>) {
    let (client, handle) = mock_client("palisade-system");
    let reviews = refusing_api_server(handle);
    let ca = TestCa::start_with_kube(client, |c| {
        c.auth = AuthMode::Kube;
        tweak(c);
    })
    .await;
    (ca, reviews)
}

/// Sends `tokens` from `source`, `batch` at a time on one HTTP/2 connection; the answers'
/// (status, code) in order.
async fn send_all(ca: &TestCa, source: &str, tokens: Vec<String>) -> Vec<(u16, String)> {
    let sender = h2_sender(ca.addr(), ca.roots.clone(), source).await;
    let body = body();
    let mut answers = Vec::with_capacity(tokens.len());
    for batch in tokens.chunks(50) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, token) in batch.iter().cloned().enumerate() {
            let (mut sender, body) = (sender.clone(), body.clone());
            tasks.spawn(async move {
                let resp = post_h2(&mut sender, &token, body).await;
                (i, resp.status, resp.error_code())
            });
        }
        let mut got: Vec<_> = tokio::time::timeout(kube_support::GUARD, tasks.join_all())
            .await
            .expect("every request answered");
        got.sort();
        answers.extend(got.into_iter().map(|(_, s, c)| (s, c)));
    }
    answers
}

#[tokio::test]
async fn one_forged_token_sent_many_times_costs_one_token_review() {
    let (ca, reviews) = kube_ca(|c| c.source_rate_limit = 0).await;
    let token = forged_for_us(0);
    let answers = send_all(&ca, "127.0.0.1", vec![token; 200]).await;
    assert!(
        answers
            .iter()
            .all(|a| *a == (401, "invalid_token".to_owned())),
        "{answers:?}"
    );
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        1,
        "200 requests with one refused token: reviews sent"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn malformed_tokens_never_reach_the_api_server() {
    let (ca, reviews) = kube_ca(|c| c.source_rate_limit = 0).await;
    let us = serde_json::json!(["palisade-ca"]);
    let rs = serde_json::json!({"alg": "RS256"});
    let cases = [
        (
            forged(
                serde_json::json!({"alg": "none"}),
                us.clone(),
                now() + 600,
                1,
            ),
            "invalid_token",
            "alg none",
        ),
        (
            forged(
                serde_json::json!({"typ": "JWT"}),
                us.clone(),
                now() + 600,
                2,
            ),
            "invalid_token",
            "no algorithm",
        ),
        (
            forged(
                rs.clone(),
                serde_json::json!(["kubernetes"]),
                now() + 600,
                3,
            ),
            "wrong_audience",
            "kubernetes",
        ),
        (
            forged(rs.clone(), us.clone(), now() - 60, 4),
            "expired_token",
            "expired",
        ),
        ("header.payload".to_owned(), "invalid_token", "three parts"),
        (
            format!("{}.!!!.c2ln", b64(rs.clone())),
            "invalid_token",
            "not base64url",
        ),
    ];
    let sender = h2_sender(ca.addr(), ca.roots.clone(), "127.0.0.1").await;
    for (token, code, says) in cases {
        let resp = post_h2(&mut sender.clone(), &token, body()).await;
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (401, code),
            "{}",
            resp.body
        );
        assert!(resp.body.contains(says), "{says}: {}", resp.body);
    }
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        0,
        "reviews sent for malformed tokens"
    );
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_source_that_keeps_failing_is_refused_before_its_tokens_are_checked() {
    let (ca, reviews) = kube_ca(|c| {
        c.source_rate_limit = 5;
        c.source_rate_limit_burst = 20;
    })
    .await;
    let started = Instant::now();
    let answers = send_all(&ca, "127.0.0.2", (0..200).map(forged_for_us).collect()).await;
    let elapsed = started.elapsed().as_secs_f64();
    let limited = answers.iter().filter(|a| a.1 == "rate_limited").count();
    let reviewed = reviews.load(Ordering::SeqCst);
    // The burst, and what the rate refills while the test runs (generously rounded up).
    let allowed = 20 + (5.0 * (elapsed + 1.0)).ceil() as usize;
    assert!(
        reviewed <= allowed,
        "{reviewed} reviews for 200 forged tokens from one source in {elapsed:.1}s (allowed {allowed})"
    );
    assert_eq!(limited + reviewed, 200, "{answers:?}");
    assert!(
        answers.iter().all(|a| a.0 == 401 || a.0 == 429),
        "{answers:?}"
    );
    // Another source is checked as usual.
    let other = send_all(&ca, "127.0.0.3", vec![forged_for_us(1000)]).await;
    assert_eq!(other, vec![(401, "invalid_token".to_owned())]);
    assert_eq!(reviews.load(Ordering::SeqCst), reviewed + 1);
    ca.running.shutdown().await;
}

/// A JWKS server that counts the fetches.
async fn jwks_server(doc: String) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/openid/v1/jwks", listener.local_addr().unwrap());
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let doc = doc.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{doc}",
                    doc.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, fetches)
}

#[tokio::test]
async fn forged_key_ids_cost_at_most_one_jwks_fetch_per_interval() {
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let doc =
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "real", "alg": "ES256",
        "x": enc(&raw[1..33]), "y": enc(&raw[33..65])}]})
        .to_string();
    let (url, fetches) = jwks_server(doc).await;
    let ca = TestCa::start_with(|c| {
        c.auth = AuthMode::Jwks {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            source: palisade_ca::auth::jwks::JwksSource::Url { url, ca_file: None },
        };
        c.source_rate_limit = 0;
    })
    .await;
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "the keys are fetched at start-up"
    );
    let started = Instant::now();
    let tokens = (0..300)
        .map(|i| {
            forged(
                serde_json::json!({"alg": "ES256", "kid": format!("forged-{i}")}),
                serde_json::json!(["palisade-ca"]),
                now() + 600,
                i,
            )
        })
        .collect();
    let answers = send_all(&ca, "127.0.0.1", tokens).await;
    let elapsed = started.elapsed();
    assert!(
        answers
            .iter()
            .all(|a| *a == (401, "invalid_token".to_owned())),
        "{answers:?}"
    );
    let forced = fetches.load(Ordering::SeqCst) - 1;
    let interval = palisade_ca::auth::jwks::FORCED_REFRESH_MIN_INTERVAL;
    let allowed = 1 + (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() as usize;
    assert!(
        forced <= allowed,
        "{forced} JWKS fetches for 300 forged key IDs in {elapsed:?} (allowed {allowed})"
    );
    assert!(forced >= 1, "an unknown key fetches the keys once");
    ca.running.shutdown().await;
}
