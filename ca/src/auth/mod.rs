//! Token authenticators: who is asking for a certificate. The seam is [`Authenticator`];
//! `local` and `jwks` live here, and the Kubernetes TokenReview one plugs in the same way.

use futures_util::future::BoxFuture;
use palisade_ca_api::wire::ErrorCode;

pub mod jwks;
pub mod jwt;
pub mod kube;
pub mod local;
pub mod precheck;

/// The workload a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token: send 'Authorization: Bearer <service-account token>' (audience palisade-ca)"
    )]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error(
        "the token has expired: read the token file again (the kubelet refreshes it) and retry"
    )]
    Expired,
    #[error(
        "the token is not for this CA (audience {0}): request a token with audience {aud}",
        aud = palisade_ca_api::wire::TOKEN_AUDIENCE
    )]
    WrongAudience(String),
    #[error("the token cannot be checked right now: {0}")]
    Unavailable(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::MissingToken,
            AuthError::Invalid(_) => ErrorCode::InvalidToken,
            AuthError::Expired => ErrorCode::ExpiredToken,
            AuthError::WrongAudience(_) => ErrorCode::WrongAudience,
            AuthError::Unavailable(_) => ErrorCode::NotReady,
        }
    }
}

/// Checks a bearer token and says whose it is.
pub trait Authenticator: Send + Sync {
    /// `local`, `jwks` or `kube`: the label of the issuance metrics and audit lines.
    fn name(&self) -> &'static str;
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<TokenIdentity, AuthError>>;
}
