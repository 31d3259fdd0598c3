//! The typed configuration of `palisade-ca serve`, checked as a whole before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_ca_api::spiffe::{validate_namespace, validate_trust_domain};
use palisade_ca_api::wire::{MAX_TTL_SECONDS, MIN_TTL_SECONDS};

use crate::auth::jwks::JwksSource;
use crate::keys::KeySource;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshSource {
    File(PathBuf),
    Kube,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    Local,
    Kube,
    Jwks { issuer: String, source: JwksSource },
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub state_dir: PathBuf,
    pub trust_domain: String,
    pub namespace: String,
    pub source: MeshSource,
    pub auth: AuthMode,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub cert_ttl: Duration,
    /// Lowers the 5-minute floor on certificate lifetimes, for rotation tests only.
    pub allow_short_ttl_for_testing: bool,
    pub keys: KeySource,
    /// Roots added to the trust bundle (e.g. the next root during a root rotation).
    pub extra_trust_roots: Option<PathBuf>,
    pub rate_limit_per_identity: u32,
    pub rate_limit_burst: u32,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// With `--source kube`: the policy of namespaces without `palisade.dev/default-policy`.
    /// (The file source takes it from the mesh file.)
    pub default_policy: DefaultPolicy,
    /// Audit lines are appended to this file instead of going to stdout.
    pub audit_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

impl ServeConfig {
    /// A configuration for tests and the demo: file source, local tokens, loopback on port 0.
    pub fn embedded(state_dir: PathBuf, mesh_file: PathBuf) -> Self {
        ServeConfig {
            state_dir,
            trust_domain: palisade_ca_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            namespace: palisade_ca_api::contract::DEFAULT_CA_NAMESPACE.into(),
            source: MeshSource::File(mesh_file),
            auth: AuthMode::Local,
            listen: "127.0.0.1:0".parse().expect("literal"),
            admin_listen: "127.0.0.1:0".parse().expect("literal"),
            cert_ttl: Duration::from_secs(3600),
            allow_short_ttl_for_testing: false,
            keys: KeySource::Generated,
            extra_trust_roots: None,
            rate_limit_per_identity: 10,
            rate_limit_burst: 20,
            shutdown_grace: Duration::from_secs(10),
            default_policy: DefaultPolicy::AllAuthenticated,
            audit_file: None,
        }
    }

    /// Smallest lifetime a caller may get.
    pub fn min_ttl(&self) -> Duration {
        if self.allow_short_ttl_for_testing {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(MIN_TTL_SECONDS)
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_trust_domain(&self.trust_domain)
            .map_err(|e| invalid("--trust-domain", e.to_string()))?;
        validate_namespace(&self.namespace).map_err(|e| invalid("--namespace", e.to_string()))?;
        let max = Duration::from_secs(MAX_TTL_SECONDS);
        if self.cert_ttl < self.min_ttl() || self.cert_ttl > max {
            return Err(invalid(
                "--cert-ttl",
                format!(
                    "{} is outside 5m..24h (use e.g. 1h)",
                    palisade_ca_api::contract::format_duration(self.cert_ttl)
                ),
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(invalid("--admin-listen", "must differ from --listen"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds_are_checked_and_kube_mode_accepted() {
        let mut c = ServeConfig::embedded("/tmp/x".into(), "/tmp/m".into());
        assert!(c.validate().is_ok());
        c.cert_ttl = Duration::from_secs(60);
        assert!(c.validate().unwrap_err().to_string().contains("--cert-ttl"));
        c.allow_short_ttl_for_testing = true;
        assert!(c.validate().is_ok());
        c.cert_ttl = Duration::from_secs(25 * 3600);
        assert!(c.validate().is_err());
        c.cert_ttl = Duration::from_secs(3600);
        c.source = MeshSource::Kube;
        c.auth = AuthMode::Kube;
        assert!(c.validate().is_ok());
    }
}
