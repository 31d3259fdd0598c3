//! The webhook's serving certificate: loaded from PEM files, checked, and swapped in place when
//! the files change (cert-manager and Secret volumes replace them without a restart). The
//! `ServerConfig` is built once; only the `CertifiedKey` behind the resolver changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_plumbing::credentials::{CredentialError, certified_key_from_pem};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}; check the path given to --tls-cert/--tls-key")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(
        "{0} holds no PEM certificate; give --tls-cert a PEM file that starts with the server certificate"
    )]
    NoCertificate(PathBuf),
    #[error("{0} is not a PEM certificate file: {1}")]
    BadCertificate(PathBuf, String),
    #[error(
        "{0} holds no usable PEM private key ({1}); give --tls-key a PKCS#8, SEC1 or PKCS#1 PEM key"
    )]
    BadKey(PathBuf, String),
    #[error(
        "the key in {key} does not belong to the certificate in {cert} ({reason}); give the matching pair"
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

pub use palisade_ca_api::tls::crypto_provider;
pub use palisade_plumbing::credentials::ReloadingResolver;

/// Paths of the serving certificate chain and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError::Read(p.to_owned(), e));
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    /// Parses and checks a chain and key read from these files.
    pub fn parse(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
        certified_key_from_pem(cert_pem, key_pem).map_err(|e| match e {
            CredentialError::NoCertificate => TlsError::NoCertificate(self.cert.clone()),
            CredentialError::BadCertificate(why) => {
                TlsError::BadCertificate(self.cert.clone(), why)
            }
            CredentialError::BadKey(why) => TlsError::BadKey(self.key.clone(), why),
            CredentialError::Mismatch(reason) => TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                reason,
            },
        })
    }
}

/// Loads the files once, for start-up: a bad certificate stops the webhook with its message.
pub fn load(files: &CertFiles) -> Result<CertifiedKey, TlsError> {
    let (cert, key) = files.read()?;
    files.parse(&cert, &key)
}

pub fn server_config(resolver: Arc<ReloadingResolver>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Polls the files and swaps the certificate when their contents change. Polling, not inotify:
/// a Secret volume replaces a symlink to a directory, which file watches do not follow.
/// A pair that fails to parse (for example, the certificate written before its key) is
/// logged and retried on the next change; the previous certificate keeps serving.
pub async fn watch_files(
    files: CertFiles,
    resolver: Arc<ReloadingResolver>,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = files.read().ok();
    let mut failed_for: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let now = match files.read() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate files unreadable; keeping the current certificate");
                continue;
            }
        };
        if last.as_ref() == Some(&now) || failed_for.as_ref() == Some(&now) {
            continue;
        }
        match files.parse(&now.0, &now.1) {
            Ok(key) => {
                resolver.swap(key);
                metrics.record_tls_reload(true);
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
                last = Some(now);
                failed_for = None;
            }
            Err(e) => {
                metrics.record_tls_reload(false);
                tracing::warn!(error = %e, "new serving certificate rejected; keeping the current one");
                failed_for = Some(now);
            }
        }
    }
}
