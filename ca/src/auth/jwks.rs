//! The `jwks` authenticator: offline verification of Kubernetes service-account JWTs against the
//! cluster issuer's public keys (a JWKS document from a file or URL), cached and refreshed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;

use super::jwt::verify_service_account_token;
use super::{AuthError, Authenticator, TokenIdentity};

/// Where the issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// `http://` or `https://` URL; for https, the CA file that signs the server.
    Url {
        url: String,
        ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "{}", p.display()),
            JwksSource::Url { url, .. } => f.write_str(url),
        }
    }
}

#[derive(Clone)]
struct KeyEntry {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Parses a JWKS document, keeping the RS256 and ES256 (P-256) keys.
pub fn parse_jwks(text: &str) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| format!("key {:?}: {e}", jwk.common.key_id))?;
        keys.push((jwk.common.key_id.clone(), alg, key));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no RS256 or ES256 key".into());
    }
    Ok(keys)
}

pub struct JwksAuthenticator {
    issuer: String,
    audience: String,
    source: JwksSource,
    keys: ArcSwap<Vec<KeyEntry>>,
    /// When a token named a key we do not have (the issuer may have rotated), the keys were
    /// last fetched for it. Held while such a fetch runs, so concurrent tokens wait for that
    /// one fetch instead of starting their own.
    forced: Mutex<Option<Instant>>,
    forced_refresh_min: Duration,
}

/// Forced refreshes (a token names an unknown key) happen at most this often, however many
/// such tokens arrive: forged key IDs cannot make the CA hammer the issuer.
pub const FORCED_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(5);
const REFRESH_EVERY: Duration = Duration::from_secs(300);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);

impl JwksAuthenticator {
    /// Loads the keys once (start-up fails if it cannot) and returns the authenticator.
    pub async fn new(
        issuer: String,
        audience: String,
        source: JwksSource,
    ) -> Result<Arc<Self>, String> {
        Self::with_forced_refresh_interval(issuer, audience, source, FORCED_REFRESH_MIN_INTERVAL)
            .await
    }

    /// [`new`](Self::new), with forced refreshes at most every `forced_refresh_min`.
    pub async fn with_forced_refresh_interval(
        issuer: String,
        audience: String,
        source: JwksSource,
        forced_refresh_min: Duration,
    ) -> Result<Arc<Self>, String> {
        let text = fetch(&source).await?;
        let keys = parse_jwks(&text).map_err(|e| format!("{source}: {e}"))?;
        let auth = Arc::new(JwksAuthenticator {
            issuer,
            audience,
            source,
            keys: ArcSwap::from_pointee(to_entries(keys)),
            forced: Mutex::new(None),
            forced_refresh_min,
        });
        Ok(auth)
    }

    /// Refreshes the keys periodically, with capped exponential backoff on failure. Runs until
    /// `shutdown` fires; the last good keys stay in use meanwhile.
    pub async fn refresh_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut wait = REFRESH_EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            match fetch(&self.source).await.and_then(|t| parse_jwks(&t)) {
                Ok(keys) => {
                    tracing::debug!(source = %self.source, keys = keys.len(), "JWKS refreshed");
                    self.keys.store(Arc::new(to_entries(keys)));
                    wait = REFRESH_EVERY;
                }
                Err(error) => {
                    wait = if wait >= REFRESH_EVERY {
                        BACKOFF_START
                    } else {
                        (wait * 2).min(BACKOFF_CAP)
                    };
                    tracing::warn!(source = %self.source, %error, retry_in = ?wait, "JWKS refresh failed; keeping the last good keys");
                }
            }
        }
    }

    fn verify_with_current_keys(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        let keys = self.keys.load();
        verify_service_account_token(token, &self.issuer, &self.audience, |kid, alg| {
            keys.iter()
                .find(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
                .map(|k| k.key.clone())
        })
    }

    /// Verifies `token`; when it names a key we do not have, fetches the keys (at most once per
    /// [`FORCED_REFRESH_MIN_INTERVAL`], shared by every token waiting) and tries once more.
    async fn verify(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        let result = self.verify_with_current_keys(token);
        if !matches!(&result, Err(AuthError::Invalid(m)) if m.contains("unknown key")) {
            return result;
        }
        self.forced_refresh().await;
        self.verify_with_current_keys(token)
    }

    async fn forced_refresh(&self) {
        let mut last = self.forced.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.forced_refresh_min) {
            return;
        }
        *last = Some(Instant::now());
        match fetch(&self.source).await.and_then(|t| parse_jwks(&t)) {
            Ok(keys) => {
                tracing::info!(source = %self.source, keys = keys.len(), "JWKS fetched for a token with an unknown key");
                self.keys.store(Arc::new(to_entries(keys)));
            }
            Err(error) => {
                tracing::warn!(source = %self.source, %error, "JWKS fetch for a token with an unknown key failed; keeping the last good keys");
            }
        }
    }
}

fn to_entries(keys: Vec<(Option<String>, Algorithm, DecodingKey)>) -> Vec<KeyEntry> {
    keys.into_iter()
        .map(|(kid, alg, key)| KeyEntry { kid, alg, key })
        .collect()
}

impl Authenticator for JwksAuthenticator {
    fn name(&self) -> &'static str {
        "jwks"
    }

    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<TokenIdentity, AuthError>> {
        Box::pin(self.verify(token))
    }
}

async fn fetch(source: &JwksSource) -> Result<String, String> {
    match source {
        JwksSource::File(path) => tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display())),
        JwksSource::Url { url, ca_file } => fetch_url(url, ca_file.as_deref())
            .await
            .map_err(|e| format!("cannot fetch JWKS from {url}: {e}")),
    }
}

async fn fetch_url(url: &str, ca_file: Option<&std::path::Path>) -> Result<String, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::rt::TokioIo;

    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("the URL has no host")?.to_owned();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("use an http:// or https:// URL".into()),
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let req = http::Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(http::header::HOST, host.as_str())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;

    async fn exchange<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static>(
        io: T,
        req: http::Request<Empty<bytes::Bytes>>,
    ) -> Result<String, String> {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        String::from_utf8(body.to_bytes().to_vec()).map_err(|_| "body is not UTF-8".into())
    }

    let work = async {
        if https {
            let ca = ca_file.ok_or("an https JWKS URL needs --jwks-ca-file")?;
            let pem = std::fs::read_to_string(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let certs = palisade_ca_api::cert::parse_pem_certs(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            let roots = palisade_ca_api::tls::root_store(&certs).map_err(|e| e.to_string())?;
            let config = rustls::ClientConfig::builder_with_provider(
                palisade_ca_api::tls::crypto_provider(),
            )
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name =
                rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange(TokioIo::new(tls), req).await
        } else {
            exchange(TokioIo::new(tcp), req).await
        }
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
#[path = "jwks_tests.rs"]
mod tests;
