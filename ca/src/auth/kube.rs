//! The `kube` authenticator: a TokenReview (`authentication.k8s.io/v1`) with audience
//! `palisade-ca` asks the API server whose token it is. Answers are cached by the token's
//! SHA-256, bounded in number and never kept past the token's own expiry.
//!
//! A review costs the API server work, so an unauthenticated caller must not be able to order
//! them at will: a token that is not a well-formed JWT for us never gets one
//! ([`super::precheck`]); a refused token is remembered for [`NEGATIVE_CACHE_SECONDS`]; and
//! requests carrying the same token at the same time share one review.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use palisade_ca_api::spiffe::{validate_namespace, validate_service_account};
use tokio::sync::OnceCell;

use super::precheck::precheck;
use super::{AuthError, Authenticator, TokenIdentity};

/// `extra` keys the API server sets for tokens bound to a pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// How many reviewed tokens are remembered (one per proxy and token rotation is plenty).
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// A cached answer is re-checked after this long even when the token lives longer, so a deleted
/// pod or service account stops getting certificates within a minute (at once for a pod the
/// pod watch sees deleted: [`PodDeletions`]).
pub const MAX_CACHE_SECONDS: i64 = 60;

/// Pods the pod watch saw deleted, by UID: a cached review of a token bound to one of them is
/// dropped rather than trusted (the API server then refuses the token). Bounded: entries older
/// than a token's longest cache life are forgotten.
#[derive(Debug, Default)]
pub struct PodDeletions(Mutex<HashMap<String, i64>>);

/// How many deletions are remembered at most.
const MAX_POD_DELETIONS: usize = 50_000;

impl PodDeletions {
    /// Records that the pod with `uid` was deleted at `now` (Unix seconds).
    pub fn deleted(&self, uid: &str, now: i64) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_POD_DELETIONS {
            seen.retain(|_, at| now - *at <= MAX_CACHE_SECONDS);
        }
        if seen.len() < MAX_POD_DELETIONS {
            seen.insert(uid.to_owned(), now);
        }
    }

    /// Whether the pod with `uid` was seen deleted.
    pub fn contains(&self, uid: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(uid)
    }
}
/// A token the API server refused is refused again without asking for this long.
pub const NEGATIVE_CACHE_SECONDS: i64 = 30;
/// How many refused tokens are remembered; past this, expired entries and then the oldest go.
pub const NEGATIVE_CACHE_ENTRIES: usize = 10_000;

type ReviewOutcome = Result<TokenIdentity, AuthError>;

pub struct KubeAuthenticator {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    max_entries: usize,
    refused: Mutex<HashMap<[u8; 32], Refused>>,
    /// Reviews under way, by token hash: a second request with the same token waits for the
    /// first one's answer instead of sending its own.
    in_flight: Mutex<HashMap<[u8; 32], Arc<OnceCell<ReviewOutcome>>>>,
    deletions: Arc<PodDeletions>,
}

struct Refused {
    error: AuthError,
    /// Unix seconds.
    until: i64,
}

#[derive(Clone)]
struct Cached {
    identity: TokenIdentity,
    /// Unix seconds; never later than the token's `exp`.
    until: i64,
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
            deletions: Arc::default(),
            max_entries: max_entries.max(1),
            refused: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Trusts no cached review of a token bound to a pod that `deletions` holds.
    pub fn with_pod_deletions(mut self, deletions: Arc<PodDeletions>) -> Self {
        self.deletions = deletions;
        self
    }

    /// Number of cached answers (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    /// [`Authenticator::authenticate`] at a given time (unix seconds), so tests can move the clock.
    pub async fn authenticate_at(&self, token: &str, now: i64) -> Result<TokenIdentity, AuthError> {
        let exp = precheck(token, &self.audience, now)?.exp;
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(hit) = self.lookup(&key, now) {
            return Ok(hit);
        }
        if let Some(refusal) = self.lookup_refused(&key, now) {
            return Err(refusal);
        }
        let review = self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .entry(key)
            .or_default()
            .clone();
        let outcome = review
            .get_or_init(|| self.review_and_remember(token, key, exp, now))
            .await
            .clone();
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        if in_flight.get(&key).is_some_and(|r| Arc::ptr_eq(r, &review)) {
            in_flight.remove(&key);
        }
        outcome
    }

    /// One TokenReview, its answer remembered (accepted or refused) before anyone waiting on
    /// it sees it, so that a request arriving after finds it in a cache.
    async fn review_and_remember(
        &self,
        token: &str,
        key: [u8; 32],
        exp: i64,
        now: i64,
    ) -> ReviewOutcome {
        let outcome = self
            .review(token)
            .await
            .and_then(|status| identity_from_status(&status, &self.audience));
        match &outcome {
            Ok(identity) => self.remember(
                key,
                Cached {
                    identity: identity.clone(),
                    until: exp.min(now + MAX_CACHE_SECONDS),
                },
                now,
            ),
            // The API server could not answer: nothing is known about the token.
            Err(AuthError::Unavailable(_)) => {}
            Err(error) => self.remember_refused(key, error.clone(), exp, now),
        }
        outcome
    }

    fn lookup_refused(&self, key: &[u8; 32], now: i64) -> Option<AuthError> {
        let mut refused = self.refused.lock().expect("negative cache lock");
        match refused.get(key) {
            Some(r) if r.until > now => Some(r.error.clone()),
            Some(_) => {
                refused.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember_refused(&self, key: [u8; 32], error: AuthError, exp: i64, now: i64) {
        let mut refused = self.refused.lock().expect("negative cache lock");
        if refused.len() >= NEGATIVE_CACHE_ENTRIES {
            refused.retain(|_, r| r.until > now);
        }
        if refused.len() >= NEGATIVE_CACHE_ENTRIES
            && let Some(oldest) = refused.iter().min_by_key(|(_, r)| r.until).map(|(k, _)| *k)
        {
            refused.remove(&oldest);
        }
        refused.insert(
            key,
            Refused {
                error,
                until: exp.min(now + NEGATIVE_CACHE_SECONDS),
            },
        );
    }

    /// Number of remembered refusals (for tests).
    pub fn refused_cached(&self) -> usize {
        self.refused.lock().expect("negative cache lock").len()
    }

    fn lookup(&self, key: &[u8; 32], now: i64) -> Option<TokenIdentity> {
        let mut cache = self.cache.lock().expect("cache lock");
        match cache.get(key) {
            Some(c)
                if c.until > now
                    && !c
                        .identity
                        .pod_uid
                        .as_deref()
                        .is_some_and(|uid| self.deletions.contains(uid)) =>
            {
                Some(c.identity.clone())
            }
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
