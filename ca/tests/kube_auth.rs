//! `--auth kube`: the TokenReview Palisade sends and what it makes of each recorded answer.

mod kube_support;

use base64::Engine;
use http::{Method, StatusCode};
use kube_support::{Scenario, fixture_with, mock_client};
use palisade_ca::auth::kube::KubeAuthenticator;
use palisade_ca::auth::{AuthError, TokenIdentity};
use palisade_ca_api::wire::ErrorCode;

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const NOW: i64 = 1_800_000_000;

/// A service-account-shaped JWT; the signature is the API server's business, not ours.
fn token(aud: Option<serde_json::Value>, exp: i64) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    };
    let mut claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:shop:web",
        "exp": exp,
        "iat": exp - 3600,
    });
    if let Some(aud) = aud {
        claims["aud"] = aud;
    }
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "kid": "k1"})),
        b64(claims)
    )
}

/// The API server answers one TokenReview of `token` with the recording `answer`.
async fn review(api: &mut Scenario, answer: &str, token: &str) -> kube_support::Seen {
    api.expect(
        Method::POST,
        REVIEWS,
        StatusCode::CREATED,
        fixture_with(answer, &[("TOKEN", token)]),
    )
    .await
}

/// Awaits an answer that must come without the API server: a request sent instead would wait
/// for an answer forever, so this fails rather than hangs.
async fn offline<T>(answer: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(kube_support::GUARD, answer)
        .await
        .expect("answered without a TokenReview")
}

fn ours(exp: i64) -> String {
    token(Some(serde_json::json!(["palisade-ca"])), exp)
}

fn setup() -> (KubeAuthenticator, Scenario) {
    let (client, handle) = mock_client("palisade-system");
    (
        KubeAuthenticator::new(client, "palisade-ca".into()),
        Scenario { handle },
    )
}

#[tokio::test]
async fn authenticated_review_names_namespace_service_account_and_pod() {
    let (auth, mut api) = setup();
    let t = ours(NOW + 600);
    let (result, seen) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        review(&mut api, "tokenreview-authenticated.json", &t).await
    });
    let body = seen.body.unwrap();
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["spec"]["token"], t.as_str());
    assert_eq!(
        body["spec"]["audiences"],
        serde_json::json!(["palisade-ca"])
    );
    assert_eq!(
        result.unwrap(),
        TokenIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod_name: Some("web-7d9c6b5f4-x2k8q".into()),
            pod_uid: Some("a3b1c2d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d".into()),
        }
    );

    // Cached: no second review while the token lives...
    assert!(offline(auth.authenticate_at(&t, NOW + 30)).await.is_ok());
    api.expect_no_more().await;
    // ...and never past its expiry, even inside the cache's own lifetime.
    assert_eq!(
        offline(auth.authenticate_at(&t, NOW + 600)).await,
        Err(AuthError::Expired)
    );
    assert_eq!(auth.cached(), 1);
}

#[tokio::test]
async fn a_pod_the_watch_saw_deleted_loses_its_cached_review() {
    let (client, handle) = mock_client("palisade-system");
    let deletions = std::sync::Arc::new(palisade_ca::auth::kube::PodDeletions::default());
    let auth =
        KubeAuthenticator::new(client, "palisade-ca".into()).with_pod_deletions(deletions.clone());
    let mut api = Scenario { handle };
    let t = ours(NOW + 3600);
    let (r, _) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        review(&mut api, "tokenreview-authenticated.json", &t).await
    });
    r.unwrap();
    assert!(
        offline(auth.authenticate_at(&t, NOW + 1)).await.is_ok(),
        "cached"
    );
    // The pod the token is bound to is deleted: the cached answer is not trusted any more,
    // and the API server is asked again (a real one then refuses the token).
    deletions.deleted("a3b1c2d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d", NOW + 2);
    let (r, seen) = tokio::join!(auth.authenticate_at(&t, NOW + 2), async {
        review(&mut api, "tokenreview-unauthenticated.json", &t).await
    });
    assert_eq!(seen.body.unwrap()["spec"]["token"], t.as_str());
    assert!(r.is_err(), "a deleted pod's token is refused: {r:?}");
    // Another pod's deletion leaves a cached review alone.
    deletions.deleted("another-uid", NOW + 3);
    assert_eq!(palisade_ca::auth::kube::MAX_CACHE_SECONDS, 60);
}

#[tokio::test]
async fn cache_is_re_reviewed_after_its_bound_and_stays_bounded() {
    let (client, handle) = mock_client("palisade-system");
    let auth = KubeAuthenticator::with_cache_size(client, "palisade-ca".into(), 2);
    let mut api = Scenario { handle };
    let long = NOW + 24 * 3600;
    for (i, at) in [NOW, NOW + 1, NOW + 2].into_iter().enumerate() {
        let t = ours(long + i as i64);
        let (r, _) = tokio::join!(auth.authenticate_at(&t, at), async {
            review(&mut api, "tokenreview-authenticated.json", &t).await
        });
        r.unwrap();
        assert!(auth.cached() <= 2);
    }
    // The token lives a day, but a cached answer is checked again after the cache bound.
    let t = ours(long + 2);
    let later = NOW + 2 + palisade_ca::auth::kube::MAX_CACHE_SECONDS;
    let (r, _) = tokio::join!(auth.authenticate_at(&t, later), async {
        review(&mut api, "tokenreview-authenticated.json", &t).await
    });
    r.unwrap();
}

#[tokio::test]
async fn unauthenticated_review_is_an_invalid_token() {
    let (auth, mut api) = setup();
    let t = ours(NOW + 600);
    let (result, _) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        review(&mut api, "tokenreview-unauthenticated.json", &t).await
    });
    let err = result.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidToken, "{err}");
    assert!(err.to_string().contains("invalidated"), "{err}");
    assert_eq!(auth.cached(), 0, "refusals are not cached");
}

#[tokio::test]
async fn wrong_audience_is_refused_by_the_review_and_before_it() {
    let (auth, mut api) = setup();
    // The API server says the token is not valid for palisade-ca.
    let t = ours(NOW + 600);
    let (result, _) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        review(&mut api, "tokenreview-wrong-audience.json", &t).await
    });
    assert_eq!(result.unwrap_err().code(), ErrorCode::WrongAudience);

    // Authenticated, but the API server reports no palisade-ca among the token's audiences.
    let t = ours(NOW + 601);
    let mut other = fixture_with("tokenreview-authenticated.json", &[("TOKEN", &t)]);
    other["status"]["audiences"] =
        serde_json::json!(["https://kubernetes.default.svc.cluster.local"]);
    let (result, _) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        api.expect(Method::POST, REVIEWS, StatusCode::CREATED, other)
            .await
    });
    assert_eq!(result.unwrap_err().code(), ErrorCode::WrongAudience);

    // A token for another audience, and one bound to no audience at all (a legacy Secret
    // token), are refused without asking the API server.
    let api_token = token(
        Some(serde_json::json!([
            "https://kubernetes.default.svc.cluster.local"
        ])),
        NOW + 600,
    );
    assert_eq!(
        offline(auth.authenticate_at(&api_token, NOW))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::WrongAudience
    );
    let legacy = token(None, NOW + 600);
    let err = offline(auth.authenticate_at(&legacy, NOW))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongAudience);
    assert!(err.to_string().contains("not audience-bound"), "{err}");
    api.expect_no_more().await;
}

#[tokio::test]
async fn api_error_is_not_ready_and_says_so() {
    let (auth, mut api) = setup();
    let t = ours(NOW + 600);
    let (result, _) = tokio::join!(auth.authenticate_at(&t, NOW), async {
        api.expect(
            Method::POST,
            REVIEWS,
            StatusCode::FORBIDDEN,
            kube_support::fixture("tokenreview-forbidden-403.json"),
        )
        .await
    });
    let err = result.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotReady, "{err}");
    assert!(err.to_string().contains("tokenreviews"), "{err}");
}

#[tokio::test]
async fn garbage_and_expired_tokens_never_reach_the_api() {
    let (auth, mut api) = setup();
    assert_eq!(
        offline(auth.authenticate_at("not-a-jwt", NOW))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::InvalidToken
    );
    assert_eq!(
        offline(auth.authenticate_at(&ours(NOW - 1), NOW)).await,
        Err(AuthError::Expired)
    );
    assert_eq!(
        offline(auth.authenticate_at("", NOW)).await,
        Err(AuthError::Missing)
    );
    api.expect_no_more().await;
}
