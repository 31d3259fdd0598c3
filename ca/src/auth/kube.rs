//! The `kube` authenticator: a TokenReview (`authentication.k8s.io/v1`) with audience
//! `palisade-ca` asks the API server whose token it is. Answers are cached by the token's
//! SHA-256, bounded in number and never kept past the token's own expiry.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use palisade_ca_api::spiffe::{validate_namespace, validate_service_account};
use serde::Deserialize;

use super::{AuthError, Authenticator, TokenIdentity};

/// `extra` keys the API server sets for tokens bound to a pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// How many reviewed tokens are remembered (one per proxy and token rotation is plenty).
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// A cached answer is re-checked after this long even when the token lives longer, so a deleted
/// pod or service account stops getting certificates soon.
pub const MAX_CACHE_SECONDS: i64 = 300;

pub struct KubeAuthenticator {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    max_entries: usize,
}

#[derive(Clone)]
struct Cached {
    identity: TokenIdentity,
    /// Unix seconds; never later than the token's `exp`.
    until: i64,
}

/// The claims read, unverified, from the token: only to refuse early and to bound the cache.
#[derive(Deserialize)]
struct UnverifiedClaims {
    exp: Option<i64>,
    #[serde(default)]
    aud: Option<Audience>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::One(a) => a == wanted,
            Audience::Many(list) => list.iter().any(|a| a == wanted),
        }
    }
}

fn unverified_claims(token: &str) -> Result<UnverifiedClaims, AuthError> {
    let not_jwt = || AuthError::Invalid("not a JSON Web Token (header.payload.signature)".into());
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    serde_json::from_slice(&bytes).map_err(|_| not_jwt())
}

impl KubeAuthenticator {
    pub fn new(client: kube::Client, audience: String) -> Self {
        Self::with_cache_size(client, audience, DEFAULT_CACHE_ENTRIES)
    }

    pub fn with_cache_size(client: kube::Client, audience: String, max_entries: usize) -> Self {
        KubeAuthenticator {
            client,
            audience,
            cache: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    /// Number of cached answers (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    /// [`Authenticator::authenticate`] at a given time (unix seconds), so tests can move the clock.
    pub async fn authenticate_at(&self, token: &str, now: i64) -> Result<TokenIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let claims = unverified_claims(token)?;
        let Some(aud) = &claims.aud else {
            return Err(AuthError::WrongAudience(
                "none: the token is not audience-bound (a legacy Secret token?); mount a projected token".into(),
            ));
        };
        if !aud.contains(&self.audience) {
            let shown = match aud {
                Audience::One(a) => a.clone(),
                Audience::Many(l) => l.join(","),
            };
            return Err(AuthError::WrongAudience(shown));
        }
        let Some(exp) = claims.exp else {
            return Err(AuthError::Invalid(
                "the token has no expiry (exp): use a projected service-account token".into(),
            ));
        };
        if exp <= now {
            return Err(AuthError::Expired);
        }
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(hit) = self.lookup(&key, now) {
            return Ok(hit);
        }
        let status = self.review(token).await?;
        let identity = identity_from_status(&status, &self.audience)?;
        self.remember(
            key,
            Cached {
                identity: identity.clone(),
                until: exp.min(now + MAX_CACHE_SECONDS),
            },
            now,
        );
        Ok(identity)
    }

    fn lookup(&self, key: &[u8; 32], now: i64) -> Option<TokenIdentity> {
        let mut cache = self.cache.lock().expect("cache lock");
        match cache.get(key) {
            Some(c) if c.until > now => Some(c.identity.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], entry: Cached, now: i64) {
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= self.max_entries {
            cache.retain(|_, c| c.until > now);
        }
        if cache.len() >= self.max_entries
            && let Some(oldest) = cache.iter().min_by_key(|(_, c)| c.until).map(|(k, _)| *k)
        {
            cache.remove(&oldest);
        }
        cache.insert(key, entry);
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                AuthError::Unavailable(format!(
                    "the Kubernetes API did not review the token ({e}); retry shortly"
                ))
            })?;
        answer.status.ok_or_else(|| {
            AuthError::Unavailable("the TokenReview came back without a status; retry".into())
        })
    }
}

/// What the API server's review says about a token, checked for the audience we asked for.
pub fn identity_from_status(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<TokenIdentity, AuthError> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "the API server did not authenticate it".into());
        if why.contains("audience") {
            return Err(AuthError::WrongAudience(why));
        }
        return Err(AuthError::Invalid(why));
    }
    // The API server lists the audiences the token is valid for among those we asked for; an
    // answer without ours means the token was not bound to palisade-ca.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(AuthError::WrongAudience(if audiences.is_empty() {
            "none reported by the TokenReview".into()
        } else {
            audiences.join(",")
        }));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Invalid("the TokenReview named no user".into()))?;
    let username = user.username.as_deref().unwrap_or_default();
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| {
            AuthError::Invalid(format!(
                "{username:?} is not a service account: use the pod's service-account token"
            ))
        })?;
    let (namespace, service_account) = rest.split_once(':').ok_or_else(|| {
        AuthError::Invalid(format!("{username:?} is not system:serviceaccount:NS:SA"))
    })?;
    validate_namespace(namespace).map_err(|e| AuthError::Invalid(e.to_string()))?;
    validate_service_account(service_account).map_err(|e| AuthError::Invalid(e.to_string()))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    Ok(TokenIdentity {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name: extra(EXTRA_POD_NAME),
        pod_uid: extra(EXTRA_POD_UID),
    })
}

impl Authenticator for KubeAuthenticator {
    fn name(&self) -> &'static str {
        "kube"
    }

    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<TokenIdentity, AuthError>> {
        Box::pin(self.authenticate_at(token, time::OffsetDateTime::now_utc().unix_timestamp()))
    }
}
