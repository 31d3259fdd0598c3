//! `palisade-proxy run` configuration: every `PALISADE_*` variable, parsed from a map so
//! tests pass a `HashMap`. Errors name the variable and the bad value.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::contract::{
    AppProbes, DEFAULT_CA_NAMESPACE, DEFAULT_TRUST_DOMAIN, INBOUND_PORT, OUTBOUND_PORT,
    PROXY_ADMIN_PORT, ca_dns_name, env, parse_duration, parse_ports, parse_probes, parse_switch,
};
use palisade_ca_api::spiffe::{
    validate_namespace, validate_service_account, validate_trust_domain,
};
use palisade_ca_api::wire::{MAX_TTL_SECONDS, MAX_WATCH_DESTINATIONS, MIN_TTL_SECONDS};

/// Where variables come from.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|v| (*v).to_owned())
    }
}

/// The process environment (only `main` uses it).
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not set: {hint}")]
    Missing { name: &'static str, hint: String },
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

pub use palisade_plumbing::logging::LogFormat;

#[derive(Debug, Clone)]
pub struct Config {
    pub ca_addr: String,
    pub ca_name: String,
    pub trust_anchors: PathBuf,
    pub token_file: PathBuf,
    pub spiffe_id: SpiffeId,
    pub pod_name: Option<String>,
    pub pod_ip: IpAddr,
    pub inbound_listen: SocketAddr,
    pub outbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub log: String,
    pub log_format: LogFormat,
    pub inbound_detect_timeout: Duration,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub destination_wait: Duration,
    pub ca_timeout: Duration,
    pub max_connections: usize,
    /// Concurrent inbound connections from one source address.
    pub max_connections_per_source: usize,
    pub max_destinations: usize,
    /// Pooled tunnels to other proxies (`PALISADE_TUNNELS`).
    pub tunnels: bool,
    pub worker_threads: usize,
    pub cert_ttl: Option<Duration>,
    pub probe_timeout: Duration,
    pub app_probes: AppProbes,
    /// Test/demo mode: every outbound connection goes here instead of `SO_ORIGINAL_DST`.
    pub outbound_destination: Option<SocketAddr>,
    /// Test/demo mode: every inbound connection is for this port instead of `SO_ORIGINAL_DST`.
    pub inbound_forward_port: Option<u16>,
    /// Inbound ports forwarded to the app's loopback address rather than the pod's own.
    pub inbound_loopback_ports: Vec<u16>,
    /// `/metrics` answers callers other than loopback.
    pub admin_remote_metrics: bool,
    /// What `init` wrote about capture, shown on `/ready`.
    pub init_report: std::path::PathBuf,
}

struct Reader<'a, E: Env> {
    env: &'a E,
}

impl<E: Env> Reader<'_, E> {
    fn raw(&self, name: &'static str) -> Option<String> {
        self.env.get(name).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str, hint: &str) -> Result<String, ConfigError> {
        self.raw(name).ok_or_else(|| ConfigError::Missing {
            name,
            hint: hint.to_owned(),
        })
    }

    fn parsed<T>(
        &self,
        name: &'static str,
        default: Option<&str>,
        hint: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let value = match (self.raw(name), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_owned(),
            (None, None) => {
                return Err(ConfigError::Missing {
                    name,
                    hint: hint.to_owned(),
                });
            }
        };
        parse(value.trim()).map_err(|reason| ConfigError::Invalid {
            name,
            value,
            reason,
        })
    }

    fn optional<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => parse(v.trim())
                .map(Some)
                .map_err(|reason| ConfigError::Invalid {
                    name,
                    value: v,
                    reason,
                }),
        }
    }

    /// `spiffe://<PALISADE_TRUST_DOMAIN>/ns/<PALISADE_NAMESPACE>/sa/<PALISADE_SERVICE_ACCOUNT>`.
    fn identity(&self) -> Result<SpiffeId, ConfigError> {
        let r = self;
        let trust_domain = r.parsed(env::TRUST_DOMAIN, Some(DEFAULT_TRUST_DOMAIN), "", |s| {
            validate_trust_domain(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        })?;
        let namespace = r.parsed(
            env::NAMESPACE,
            None,
            "set it to the pod's namespace (downward API metadata.namespace)",
            |s| {
                validate_namespace(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            },
        )?;
        let service_account = r.parsed(
            env::SERVICE_ACCOUNT,
            None,
            "set it to the pod's service account (downward API spec.serviceAccountName)",
            |s| {
                validate_service_account(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            },
        )?;
        SpiffeId::new(&trust_domain, &namespace, &service_account).map_err(|e| {
            ConfigError::Invalid {
                name: env::SERVICE_ACCOUNT,
                value: service_account.clone(),
                reason: e.to_string(),
            }
        })
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        self.parsed(name, Some(default), "", parse_duration)
    }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected IP:port, for example 0.0.0.0:{INBOUND_PORT}"))
}

fn host_port(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or_else(|| {
        format!(
            "expected host:port, for example {}",
            palisade_ca_api::contract::ca_addr(DEFAULT_CA_NAMESPACE)
        )
    })?;
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port:?} is not 1-65535"))?;
    Ok(s.to_owned())
}

fn count(min: usize, max: usize) -> impl Fn(&str) -> Result<usize, String> {
    move |s| {
        s.parse::<usize>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| format!("expected a whole number from {min} to {max}"))
    }
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Config, ConfigError> {
        let r = Reader { env };
        let spiffe_id = r.identity()?;
        let config = Config {
            ca_addr: r.parsed(
                env::CA_ADDR,
                None,
                &format!(
                    "set it to the CA's host:port, for example {}",
                    palisade_ca_api::contract::ca_addr(DEFAULT_CA_NAMESPACE)
                ),
                host_port,
            )?,
            ca_name: r.parsed(env::CA_NAME, Some(&ca_dns_name(DEFAULT_CA_NAMESPACE)), "", |s| {
                rustls_pki_types::ServerName::try_from(s.to_owned())
                    .map(|_| s.to_owned())
                    .map_err(|_| "expected the DNS name on the CA's certificate".to_owned())
            })?,
            trust_anchors: PathBuf::from(r.required(
                env::TRUST_ANCHORS,
                "set it to the PEM file of the mesh's trust anchors (the palisade-trust-anchors ConfigMap)",
            )?),
            token_file: PathBuf::from(r.required(
                env::TOKEN_FILE,
                "set it to the projected service-account token (audience palisade-ca)",
            )?),
            spiffe_id,
            pod_name: r.raw(env::POD_NAME),
            pod_ip: r.parsed(
                env::POD_IP,
                None,
                "set it to the pod's IP (downward API status.podIP)",
                |s| s.parse::<IpAddr>().map_err(|_| "expected an IP address".to_owned()),
            )?,
            inbound_listen: r.parsed(env::INBOUND_LISTEN, Some(&format!("0.0.0.0:{INBOUND_PORT}")), "", socket_addr)?,
            outbound_listen: r.parsed(env::OUTBOUND_LISTEN, Some(&format!("127.0.0.1:{OUTBOUND_PORT}")), "", socket_addr)?,
            admin_listen: r.parsed(env::ADMIN_LISTEN, Some(&format!("0.0.0.0:{PROXY_ADMIN_PORT}")), "", socket_addr)?,
            log: r.parsed(env::LOG, Some("info"), "", |s| {
                palisade_plumbing::logging::parse_filter(s).map(|_| s.to_owned())
            })?,
            log_format: r.parsed(env::LOG_FORMAT, Some("json"), "", str::parse)?,
            inbound_detect_timeout: r.duration(env::INBOUND_DETECT_TIMEOUT, "200ms")?,
            drain_timeout: r.duration(env::DRAIN_TIMEOUT, "30s")?,
            connect_timeout: r.duration(env::CONNECT_TIMEOUT, "5s")?,
            handshake_timeout: r.duration(env::HANDSHAKE_TIMEOUT, "5s")?,
            idle_timeout: r.duration(env::IDLE_TIMEOUT, "1h")?,
            destination_wait: r.duration(env::DESTINATION_WAIT, "2s")?,
            ca_timeout: r.duration(env::CA_TIMEOUT, "10s")?,
            max_connections: r.parsed(env::MAX_CONNECTIONS, Some("8192"), "", count(1, 1_000_000))?,
            max_connections_per_source: r.parsed(
                env::MAX_CONNECTIONS_PER_SOURCE,
                Some("1024"),
                "",
                count(1, 1_000_000),
            )?,
            max_destinations: r.parsed(
                env::MAX_DESTINATIONS,
                Some("256"),
                "",
                count(1, MAX_WATCH_DESTINATIONS),
            )?,
            tunnels: r.parsed(env::TUNNELS, Some("on"), "", parse_on_off)?,
            worker_threads: r.parsed(env::WORKER_THREADS, Some("1"), "", count(1, 64))?,
            cert_ttl: r.optional(env::CERT_TTL, |s| {
                let d = parse_duration(s)?;
                if (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&d.as_secs()) {
                    Ok(d)
                } else {
                    Err("the CA issues from 5m to 24h".to_owned())
                }
            })?,
            probe_timeout: r.duration(env::PROBE_TIMEOUT, "1s")?,
            app_probes: r.optional(env::APP_PROBES, parse_probes)?.unwrap_or_default(),
            outbound_destination: r.optional(env::OUTBOUND_DESTINATION, socket_addr)?,
            inbound_forward_port: r.optional(env::INBOUND_FORWARD_PORT, |s| {
                s.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| "expected a port 1-65535".to_owned())
            })?,
            inbound_loopback_ports: r
                .optional(env::INBOUND_LOOPBACK_PORTS, parse_ports)?
                .unwrap_or_default(),
            admin_remote_metrics: r
                .optional(env::ADMIN_REMOTE_METRICS, parse_switch)?
                .unwrap_or(false),
            init_report: r
                .optional(env::INIT_REPORT, |s| Ok(std::path::PathBuf::from(s)))?
                .unwrap_or_else(|| palisade_ca_api::contract::INIT_REPORT_FILE.into()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks across variables.
    fn validate(&self) -> Result<(), ConfigError> {
        let ports = [
            (env::INBOUND_LISTEN, self.inbound_listen),
            (env::OUTBOUND_LISTEN, self.outbound_listen),
            (env::ADMIN_LISTEN, self.admin_listen),
        ];
        for (i, (name, a)) in ports.iter().enumerate() {
            for (other, b) in &ports[i + 1..] {
                if a.port() != 0 && a.port() == b.port() {
                    return Err(ConfigError::Invalid {
                        name,
                        value: a.to_string(),
                        reason: format!("same port as {other}; each listener needs its own"),
                    });
                }
            }
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(ConfigError::Invalid {
                name: env::MAX_CONNECTIONS_PER_SOURCE,
                value: self.max_connections_per_source.to_string(),
                reason: format!(
                    "more than {} ({}): one source cannot have more than all; lower it or raise the other",
                    env::MAX_CONNECTIONS,
                    self.max_connections
                ),
            });
        }
        if self.inbound_detect_timeout > Duration::from_secs(10)
            || self.inbound_detect_timeout.is_zero()
        {
            return Err(ConfigError::Invalid {
                name: env::INBOUND_DETECT_TIMEOUT,
                value: format!("{:?}", self.inbound_detect_timeout),
                reason: "use a short window from 1ms to 10s (default 200ms)".into(),
            });
        }
        for (name, d) in [
            (env::CONNECT_TIMEOUT, self.connect_timeout),
            (env::HANDSHAKE_TIMEOUT, self.handshake_timeout),
            (env::IDLE_TIMEOUT, self.idle_timeout),
            (env::DESTINATION_WAIT, self.destination_wait),
            (env::CA_TIMEOUT, self.ca_timeout),
            (env::PROBE_TIMEOUT, self.probe_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    name,
                    value: "0".into(),
                    reason: "must be more than zero".into(),
                });
            }
        }
        Ok(())
    }
}

/// `on` or `off`. Pure.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("write on or off".to_owned()),
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
