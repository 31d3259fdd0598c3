//! The command line of `palisade-injector` (DESIGN.md, "Command lines"). Every flag also reads
//! a `PALISADE_*` variable; `into_config` turns the parsed values into a checked `ServeConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

use palisade_ca_api::contract::{
    self, CONTROL_PLANE_ADMIN_PORT, DEFAULT_CA_NAMESPACE, DEFAULT_TRUST_DOMAIN, INJECTOR_PORT,
};

use crate::annotations::ValueError;
use crate::server::ServeConfig;
use crate::settings::RawSettings;
use crate::tls::CertFiles;

#[derive(Debug, Parser)]
#[command(
    name = "palisade-injector",
    version,
    about = "Palisade's mutating admission webhook: adds palisade-proxy to pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /mutate over HTTPS, and /ready, /live, /metrics on the admin port.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// PEM certificate chain of the webhook, server certificate first; reloaded on change.
    #[arg(long, env = "PALISADE_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate; reloaded on change.
    #[arg(long, env = "PALISADE_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Address of the HTTPS webhook.
    #[arg(long, env = "PALISADE_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], INJECTOR_PORT)))]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin endpoints (/ready, /live, /metrics).
    #[arg(long, env = "PALISADE_ADMIN_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], CONTROL_PLANE_ADMIN_PORT)))]
    pub admin_listen: SocketAddr,
    /// Image of palisade-proxy, used for the proxy and for palisade-init.
    #[arg(long, env = "PALISADE_PROXY_IMAGE", default_value = concat!("palisade-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// host:port of the CA, given to proxies as PALISADE_CA_ADDR.
    #[arg(long, env = "PALISADE_CA_ADDR", default_value_t = contract::ca_addr(DEFAULT_CA_NAMESPACE))]
    pub ca_addr: String,
    /// DNS name proxies verify on the CA's certificate (PALISADE_CA_NAME).
    #[arg(long, env = "PALISADE_CA_NAME", default_value_t = contract::ca_dns_name(DEFAULT_CA_NAMESPACE))]
    pub ca_name: String,
    /// The mesh's trust domain, given to proxies as PALISADE_TRUST_DOMAIN; it must be the
    /// CA's `--trust-domain`, or the CA refuses their certificate requests.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Inject the proxy as a native sidecar (Kubernetes 1.29+); false: first regular container.
    #[arg(long, env = "PALISADE_NATIVE_SIDECAR", default_value_t = true, action = ArgAction::Set)]
    pub native_sidecar: bool,
    /// CPU request of the proxy (annotation palisade.dev/proxy-cpu-request overrides it).
    #[arg(long, env = "PALISADE_PROXY_CPU_REQUEST", default_value = "100m")]
    pub proxy_cpu_request: String,
    /// CPU limit of the proxy; none by default.
    #[arg(long, env = "PALISADE_PROXY_CPU_LIMIT")]
    pub proxy_cpu_limit: Option<String>,
    /// Memory request of the proxy.
    #[arg(long, env = "PALISADE_PROXY_MEMORY_REQUEST", default_value = "64Mi")]
    pub proxy_memory_request: String,
    /// Memory limit of the proxy (annotation palisade.dev/proxy-memory-limit overrides it).
    #[arg(long, env = "PALISADE_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    pub proxy_memory_limit: String,
    /// PALISADE_LOG of injected proxies (annotation palisade.dev/log-level overrides it).
    #[arg(long, env = "PALISADE_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,
    /// The address families the nodes capture, IPv4 and/or IPv6 (comma-separated): a pod that
    /// skips a range of another family is refused, since that family is closed in its pods.
    #[arg(long, env = "PALISADE_IP_FAMILIES", default_value = "IPv4,IPv6")]
    pub ip_families: String,
    /// Largest AdmissionReview body accepted, in bytes; larger ones get HTTP 413.
    #[arg(long, env = "PALISADE_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// How often the certificate files are checked for changes, e.g. 500ms, 2s, 1m.
    #[arg(long, env = "PALISADE_TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub tls_reload_interval: Duration,
    /// Most webhook connections served at once; further ones are refused (closed at once).
    #[arg(long, env = "PALISADE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Most webhook connections from one source address; further ones are refused.
    #[arg(
        long,
        env = "PALISADE_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 256
    )]
    pub max_connections_per_source: usize,
    /// Log filter of the injector itself (tracing syntax, e.g. info or debug).
    #[arg(long, env = "PALISADE_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "PALISADE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
}

/// The contract's duration form, above zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match contract::parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text:?} is zero; give a positive interval")),
        d => Ok(d),
    }
}

impl ServeArgs {
    pub fn into_config(self) -> Result<ServeConfig, ValueError> {
        let settings = RawSettings {
            proxy_image: self.proxy_image,
            ca_addr: self.ca_addr,
            ca_name: self.ca_name,
            trust_domain: self.trust_domain,
            native_sidecar: self.native_sidecar,
            cpu_request: self.proxy_cpu_request,
            cpu_limit: self.proxy_cpu_limit,
            memory_request: self.proxy_memory_request,
            memory_limit: self.proxy_memory_limit,
            log_level: self.proxy_log_level,
            ip_families: self.ip_families,
        }
        .validate()?;
        if self.max_request_bytes < 1024 {
            return Err(ValueError {
                setting: "--max-request-bytes".into(),
                value: self.max_request_bytes.to_string(),
                reason: "too small for any pod".into(),
                accepted: "a byte count of at least 1024 (default 4194304)",
            });
        }
        Ok(ServeConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            cert_files: CertFiles {
                cert: self.tls_cert,
                key: self.tls_key,
            },
            settings,
            max_request_bytes: self.max_request_bytes,
            tls_reload_interval: self.tls_reload_interval,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec![
            "palisade-injector",
            "serve",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ];
        argv.extend(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Serve(args) => args,
        })
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = parse(&[]).unwrap().into_config().unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:15017");
        assert_eq!(config.admin_listen.to_string(), "0.0.0.0:15014");
        assert!(config.settings.native_sidecar());
        assert_eq!(
            config.settings.ca_addr(),
            "palisade-ca.palisade-system.svc:15012"
        );
    }

    #[test]
    fn native_sidecar_takes_a_value() {
        let config = parse(&["--native-sidecar", "false"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(!config.settings.native_sidecar());
        assert!(parse(&["--native-sidecar", "maybe"]).is_err());
    }

    #[test]
    fn bad_setting_names_the_flag() {
        let err = parse(&["--proxy-memory-limit", "lots"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("--proxy-memory-limit=\"lots\""),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            positive_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(positive_duration("1m").unwrap(), Duration::from_secs(60));
        for bad in ["", "2", "s", "0s", "-1s"] {
            assert!(positive_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trust_domain_reaches_the_settings() {
        let config = parse(&["--trust-domain", "prod.example.org"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(config.settings.trust_domain(), "prod.example.org");
        assert_eq!(
            parse(&[])
                .unwrap()
                .into_config()
                .unwrap()
                .settings
                .trust_domain(),
            "cluster.local"
        );
    }
}
