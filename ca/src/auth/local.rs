//! The `local` authenticator: a token issuer key in the state directory signs dev tokens shaped
//! like Kubernetes service-account tokens (ES256), for the embedded mode.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use palisade_ca_api::spiffe::{validate_namespace, validate_service_account};
use rcgen::KeyPair;

use super::jwt::{KubernetesClaims, ObjectRef, ServiceAccountClaims, verify_service_account_token};
use super::{AuthError, Authenticator, TokenIdentity};
use crate::keys::{KeyError, write_private};

pub const ISSUER_KEY_FILE: &str = "token-issuer-key.pem";
/// The `iss` of local tokens.
pub const LOCAL_ISSUER: &str = "palisade-local";

pub struct LocalIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

impl LocalIssuer {
    /// Loads the issuer key from the state directory, creating it (mode 0600) when absent.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, KeyError> {
        std::fs::create_dir_all(state_dir).map_err(|e| KeyError::Write(state_dir.into(), e))?;
        let path = state_dir.join(ISSUER_KEY_FILE);
        let key = if path.exists() {
            let pem =
                std::fs::read_to_string(&path).map_err(|e| KeyError::Read(path.clone(), e))?;
            KeyPair::from_pem(&pem).map_err(|e| KeyError::Parse(path.clone(), e.to_string()))?
        } else {
            let key = KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
            write_private(&path, key.serialize_pem().as_bytes())?;
            key
        };
        let parse = |e: jsonwebtoken::errors::Error| KeyError::Parse(path.clone(), e.to_string());
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).map_err(parse)?;
        let decoding = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).map_err(parse)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
        let kid = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(LocalIssuer {
            encoding,
            decoding,
            kid,
        })
    }

    /// A service-account-shaped token for `namespace/service_account`.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        audience: &str,
        ttl: Duration,
    ) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        self.mint_with_times(
            namespace,
            service_account,
            pod,
            audience,
            now,
            now + ttl.as_secs(),
        )
    }

    /// Like [`mint`](Self::mint) with explicit issue and expiry times (Unix seconds).
    pub fn mint_with_times(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        audience: &str,
        now: u64,
        exp: u64,
    ) -> Result<String, String> {
        validate_namespace(namespace).map_err(|e| e.to_string())?;
        validate_service_account(service_account).map_err(|e| e.to_string())?;
        let claims = ServiceAccountClaims {
            iss: LOCAL_ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![audience.into()],
            exp,
            nbf: Some(now),
            iat: Some(now),
            kubernetes: KubernetesClaims {
                namespace: namespace.into(),
                serviceaccount: ObjectRef {
                    name: service_account.into(),
                    uid: String::new(),
                },
                pod: pod.map(|p| ObjectRef {
                    name: p.into(),
                    uid: String::new(),
                }),
            },
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())
    }

    pub fn verify(&self, token: &str, audience: &str) -> Result<TokenIdentity, AuthError> {
        verify_service_account_token(token, LOCAL_ISSUER, audience, |kid, alg| {
            (alg == Algorithm::ES256 && kid == Some(self.kid.as_str()))
                .then(|| self.decoding.clone())
        })
    }
}

/// Authenticates tokens minted by [`LocalIssuer`].
pub struct LocalAuthenticator {
    pub issuer: LocalIssuer,
    pub audience: String,
}

impl Authenticator for LocalAuthenticator {
    fn name(&self) -> &'static str {
        "local"
    }

    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<TokenIdentity, AuthError>> {
        Box::pin(async move { self.issuer.verify(token, &self.audience) })
    }
}
