//! Verification of Kubernetes service-account JWTs, shared by the `local` and `jwks`
//! authenticators.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, TokenIdentity};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The claims of a bound service-account token, as the Kubernetes API server issues them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceAccountClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// The algorithms Palisade accepts on service-account tokens.
pub const ACCEPTED_ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// Verifies `token` with the key `find_key` returns for its `kid` and algorithm, then checks
/// issuer, audience, expiry and the Kubernetes claims.
pub fn verify_service_account_token(
    token: &str,
    issuer: &str,
    audience: &str,
    find_key: impl Fn(Option<&str>, Algorithm) -> Option<DecodingKey>,
) -> Result<TokenIdentity, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Invalid("longer than 16 KiB".into()));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| {
        AuthError::Invalid("not a JWT (expected header.payload.signature in base64url)".into())
    })?;
    if !ACCEPTED_ALGORITHMS.contains(&header.alg) {
        return Err(AuthError::Invalid(format!(
            "signed with {:?}; RS256 or ES256 expected",
            header.alg
        )));
    }
    let key = find_key(header.kid.as_deref(), header.alg).ok_or_else(|| {
        AuthError::Invalid(format!(
            "signed by an unknown key (kid {:?}): the token is from another issuer, or the issuer's keys changed",
            header.kid.as_deref().unwrap_or("")
        ))
    })?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<ServiceAccountClaims>(token, &key, &validation).map_err(
        |e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidAudience => AuthError::WrongAudience(audience_of(token)),
            ErrorKind::InvalidIssuer => AuthError::Invalid(format!(
                "issued by {:?}, not by {issuer:?}",
                issuer_of(token)
            )),
            ErrorKind::ImmatureSignature => {
                AuthError::Invalid("not valid yet (nbf is in the future): check the clocks".into())
            }
            ErrorKind::InvalidSignature => {
                AuthError::Invalid("the signature does not verify".into())
            }
            ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid(
                "claims are not those of a Kubernetes service-account token".into(),
            ),
            other => AuthError::Invalid(format!("{other:?}")),
        },
    )?;
    let claims = data.claims;
    let k = &claims.kubernetes;
    let expected_sub = format!(
        "system:serviceaccount:{}:{}",
        k.namespace, k.serviceaccount.name
    );
    if claims.sub != expected_sub {
        return Err(AuthError::Invalid(format!(
            "subject {:?} does not match its kubernetes.io claims ({expected_sub:?})",
            claims.sub
        )));
    }
    Ok(TokenIdentity {
        namespace: k.namespace.clone(),
        service_account: k.serviceaccount.name.clone(),
        pod_name: k.pod.as_ref().map(|p| p.name.clone()),
        pod_uid: k
            .pod
            .as_ref()
            .map(|p| p.uid.clone())
            .filter(|u| !u.is_empty()),
    })
}

/// Unverified payload fields, only to make error messages useful.
fn unverified_claim(token: &str, field: &str) -> String {
    use base64::Engine;
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get(field).cloned())
        .map(|v| v.to_string())
        .unwrap_or_else(|| "?".into())
}

fn audience_of(token: &str) -> String {
    unverified_claim(token, "aud")
}

fn issuer_of(token: &str) -> String {
    unverified_claim(token, "iss")
}
