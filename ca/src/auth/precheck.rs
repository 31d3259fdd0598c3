//! The cheap look at a bearer token before anyone is asked about it: a token that is not a
//! well-formed JWT for us (three base64url parts, a JSON header naming a signing algorithm other
//! than `none`, a JSON payload whose `aud` holds our audience and whose `exp` lies ahead) is
//! refused here, with a message that says which of these it missed, and never costs a
//! TokenReview. Nothing here is verified: a token that passes still has to be checked.

use base64::Engine;
use serde::Deserialize;

use super::AuthError;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What the unverified payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedClaims {
    /// Unix seconds.
    pub exp: i64,
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

    fn shown(&self) -> String {
        match self {
            Audience::One(a) => a.clone(),
            Audience::Many(l) => l.join(","),
        }
    }
}

fn invalid(why: &str) -> AuthError {
    AuthError::Invalid(format!(
        "not a JSON Web Token: {why}; send the pod's projected service-account token"
    ))
}

type Object = serde_json::Map<String, serde_json::Value>;

fn decode_part(part: &str, name: &str) -> Result<Object, AuthError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| invalid(&format!("its {name} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| invalid(&format!("its {name} is not a JSON object")))
}

/// Refuses `token` unless it is a well-formed JWT for `audience` that has not expired at `now`
/// (unix seconds).
pub fn precheck(token: &str, audience: &str, now: i64) -> Result<UnverifiedClaims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid("it is longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("it is not three parts header.payload.signature"));
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(invalid(
            "one of its three parts is empty (an unsigned token?)",
        ));
    }
    let header = decode_part(header, "header")?;
    match header.get("alg").and_then(|a| a.as_str()) {
        None => return Err(invalid("its header names no algorithm (alg)")),
        Some(alg) if alg.eq_ignore_ascii_case("none") => {
            return Err(AuthError::Invalid(
                "the token is unsigned (alg none): only signed service-account tokens are accepted"
                    .into(),
            ));
        }
        Some(_) => {}
    }
    if base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature.trim_end_matches('='))
        .is_err()
    {
        return Err(invalid("its signature is not base64url"));
    }
    let payload = decode_part(payload, "payload")?;
    let aud =
        match payload.get("aud") {
            None | Some(serde_json::Value::Null) => None,
            Some(aud) => Some(Audience::deserialize(aud).map_err(|_| {
                invalid("its audience (aud) is neither a string nor a list of them")
            })?),
        };
    let Some(aud) = &aud else {
        return Err(AuthError::WrongAudience(
            "none: the token is not audience-bound (a legacy Secret token?); mount a projected token".into(),
        ));
    };
    if !aud.contains(audience) {
        return Err(AuthError::WrongAudience(aud.shown()));
    }
    let Some(exp) = payload.get("exp").and_then(serde_json::Value::as_i64) else {
        return Err(AuthError::Invalid(
            "the token has no expiry (exp): use a projected service-account token".into(),
        ));
    };
    if exp <= now {
        return Err(AuthError::Expired);
    }
    Ok(UnverifiedClaims { exp })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn b64(v: serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    }

    fn jwt(header: serde_json::Value, payload: serde_json::Value) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    fn good_payload() -> serde_json::Value {
        serde_json::json!({"aud": ["palisade-ca"], "exp": NOW + 600, "sub": "system:serviceaccount:shop:web"})
    }

    fn refusal(token: &str) -> AuthError {
        precheck(token, "palisade-ca", NOW).unwrap_err()
    }

    #[test]
    fn a_well_formed_token_for_us_passes() {
        let t = jwt(
            serde_json::json!({"alg": "RS256", "kid": "k"}),
            good_payload(),
        );
        assert_eq!(
            precheck(&t, "palisade-ca", NOW),
            Ok(UnverifiedClaims { exp: NOW + 600 })
        );
        let one = jwt(
            serde_json::json!({"alg": "ES256"}),
            serde_json::json!({"aud": "palisade-ca", "exp": NOW + 1}),
        );
        assert!(precheck(&one, "palisade-ca", NOW).is_ok());
    }

    #[test]
    fn each_malformation_is_refused_with_what_it_missed() {
        let rs = serde_json::json!({"alg": "RS256"});
        let cases: Vec<(String, &str)> = vec![
            ("a.b".into(), "three parts"),
            ("a.b.c.d".into(), "three parts"),
            (
                format!("{}.{}.", b64(rs.clone()), b64(good_payload())),
                "empty",
            ),
            ("!!!.e30.c2ln".into(), "header is not base64url"),
            (
                format!("{}.e30.c2ln", b64(serde_json::json!([1]))),
                "header is not a JSON object",
            ),
            (
                jwt(serde_json::json!({"typ": "JWT"}), good_payload()),
                "no algorithm",
            ),
            (
                jwt(serde_json::json!({"alg": "none"}), good_payload()),
                "alg none",
            ),
            (
                jwt(serde_json::json!({"alg": "NONE"}), good_payload()),
                "alg none",
            ),
            (
                format!("{}.%%%.c2ln", b64(rs.clone())),
                "payload is not base64url",
            ),
            (
                format!("{}.{}.%%", b64(rs.clone()), b64(good_payload())),
                "signature is not base64url",
            ),
            (
                jwt(rs.clone(), serde_json::json!({"aud": ["palisade-ca"]})),
                "no expiry",
            ),
            (
                jwt(
                    rs.clone(),
                    serde_json::json!({"aud": ["palisade-ca"], "exp": "soon"}),
                ),
                "no expiry",
            ),
            ("x".repeat(MAX_TOKEN_BYTES + 1), "16 KiB"),
        ];
        for (token, says) in cases {
            let err = refusal(&token);
            assert_eq!(
                err.code(),
                palisade_ca_api::wire::ErrorCode::InvalidToken,
                "{token:.60}: {err}"
            );
            assert!(err.to_string().contains(says), "{token:.60}: {err}");
        }
    }

    #[test]
    fn audience_and_expiry_are_their_own_errors() {
        let rs = serde_json::json!({"alg": "RS256"});
        let other = jwt(
            rs.clone(),
            serde_json::json!({"aud": ["kubernetes"], "exp": NOW + 600}),
        );
        assert_eq!(
            refusal(&other),
            AuthError::WrongAudience("kubernetes".into())
        );
        let unbound = jwt(rs.clone(), serde_json::json!({"exp": NOW + 600}));
        assert!(
            matches!(refusal(&unbound), AuthError::WrongAudience(m) if m.contains("not audience-bound"))
        );
        let expired = jwt(rs, serde_json::json!({"aud": "palisade-ca", "exp": NOW}));
        assert_eq!(refusal(&expired), AuthError::Expired);
        assert_eq!(refusal(""), AuthError::Missing);
    }
}
