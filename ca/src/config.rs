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
    /// The longest lifetime a caller gets; a longer `ttl_seconds` is cut to it.
    pub max_cert_ttl: Duration,
    /// Lowers the 5-minute floor on certificate lifetimes, for rotation tests only.
    pub allow_short_ttl_for_testing: bool,
    pub keys: KeySource,
    /// Roots added to the trust bundle (e.g. the next root during a root rotation).
    pub extra_trust_roots: Option<PathBuf>,
    /// Kubernetes mode: issue the injector's serving certificate and keep the webhook's
    /// `caBundle` current (`crate::kube::injector_tls`).
    pub manage_injector_tls: bool,
    pub rate_limit_per_identity: u32,
    pub rate_limit_burst: u32,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// With `--source kube`: the policy of namespaces without `palisade.dev/default-policy`.
    /// (The file source takes it from the mesh file.)
    pub default_policy: DefaultPolicy,
    /// Audit lines are appended to this file instead of going to stdout.
    pub audit_file: Option<PathBuf>,
    /// Token checks per second allowed per source address (0: no limit). Taken before the
    /// token is checked and given back when it is valid, so only failed checks count.
    pub source_rate_limit: u32,
    pub source_rate_limit_burst: u32,
    /// The bounds of the API port's connections.
    pub connections: ConnectionLimits,
    /// The bounds of the admin port's connections.
    pub admin_limits: palisade_plumbing::admin_http::Limits,
    /// Rotation of the generated root and intermediate: schedule, lifetimes, pacing.
    pub rotation: crate::rotation::Settings,
    /// This pod's name (`PALISADE_POD_NAME`, from the downward API): who holds the rotation Lease in
    /// Kubernetes mode. The hostname when unset.
    pub pod_name: Option<String>,
}

/// The bounds of every connection to the API port: how many, how long each may take to say
/// something, and how much HTTP/2 may ask of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// From accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; more wait their turn, first come first served, for at
    /// most the header-read timeout from accept.
    pub max_concurrent_handshakes: usize,
    /// For the headers of a request (HTTP/1.1), and for the first request of a connection.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 streams open at once per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 header list size (decoded bytes) of one request.
    pub h2_max_header_list_size: u32,
    /// HTTP/2 keep-alive: a PING this often...
    pub h2_keepalive_interval: Duration,
    /// ...and a peer that has not answered within this is gone.
    pub h2_keepalive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            max_connections_per_source: 64,
            handshake_timeout: Duration::from_secs(5),
            max_concurrent_handshakes: crate::server::handshakes::default_concurrency(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 16 * 1024,
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(10),
        }
    }
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
            max_cert_ttl: Duration::from_secs(MAX_TTL_SECONDS),
            allow_short_ttl_for_testing: false,
            keys: KeySource::Generated,
            extra_trust_roots: None,
            manage_injector_tls: false,
            rate_limit_per_identity: 10,
            rate_limit_burst: 20,
            shutdown_grace: Duration::from_secs(10),
            default_policy: DefaultPolicy::AllAuthenticated,
            audit_file: None,
            source_rate_limit: 5,
            source_rate_limit_burst: 20,
            connections: ConnectionLimits::default(),
            admin_limits: palisade_plumbing::admin_http::Limits::default(),
            rotation: crate::rotation::Settings::default(),
            pod_name: None,
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
        if self.manage_injector_tls && !matches!(self.source, MeshSource::Kube) {
            return Err(invalid(
                "--manage-injector-tls",
                "needs --source kube: the injector's certificate and webhook live in the cluster",
            ));
        }
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
        if self.max_cert_ttl < self.cert_ttl || self.max_cert_ttl > max {
            return Err(invalid(
                "--max-cert-ttl",
                format!(
                    "{} is outside --cert-ttl ({})..24h: a default longer than the cap could not be issued",
                    palisade_ca_api::contract::format_duration(self.max_cert_ttl),
                    palisade_ca_api::contract::format_duration(self.cert_ttl)
                ),
            ));
        }
        let c = &self.connections;
        if c.max_connections == 0 {
            return Err(invalid("--max-connections", "must be at least 1"));
        }
        if c.max_connections_per_source == 0 {
            return Err(invalid(
                "--max-connections-per-source",
                "must be at least 1",
            ));
        }
        if c.max_concurrent_handshakes == 0 {
            return Err(invalid("--max-concurrent-handshakes", "must be at least 1"));
        }
        for (flag, d) in [
            ("--tls-handshake-timeout", c.handshake_timeout),
            ("--header-read-timeout", c.header_read_timeout),
            ("--idle-timeout", c.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(flag, "must be more than 0 (use e.g. 10s)"));
            }
        }
        let r = &self.rotation;
        if !(50..=95).contains(&r.root_rotate_at_percent) {
            return Err(invalid(
                "--rotate-root-at",
                "must be a percentage of the root's life in 50..95 (the default is 80)",
            ));
        }
        if r.lifetimes.intermediate < time::Duration::minutes(10) {
            return Err(invalid(
                "--intermediate-lifetime",
                "must be at least 10m (the default is 365d)",
            ));
        }
        if r.lifetimes.root <= r.lifetimes.intermediate {
            return Err(invalid(
                "--root-lifetime",
                "must be longer than --intermediate-lifetime (the defaults are 3650d and 365d)",
            ));
        }
        if r.renew_window.is_zero() || r.trust_deadline.is_zero() {
            return Err(invalid(
                "--rotation-renew-window",
                "it and --rotation-trust-deadline must be more than 0 (e.g. 5m and 1h)",
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
