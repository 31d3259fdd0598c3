//! `palisade-proxy run`'s environment: the variable names, and [`ProxyEnv`], the set of them
//! the injector gives every proxy. The proxy parses the same names (palisade-proxy's
//! `config.rs`), so a variable it requires cannot be missing from an injected pod: the
//! injector renders exactly [`ProxyEnv::vars`].

use super::annotations::{ADMIN_REMOTE_METRICS, INBOUND_LOOPBACK_PORTS};
use super::{APP_PROBES_ANNOTATION, INBOUND_PORT, OUTBOUND_PORT, PROXY_ADMIN_PORT};
use super::{TOKEN_DIR, TOKEN_FILE_NAME, TRUST_ANCHORS_KEY, TRUST_DIR};

/// Every `PALISADE_*` variable `palisade-proxy` reads.
pub mod env {
    pub const CA_ADDR: &str = "PALISADE_CA_ADDR";
    pub const CA_NAME: &str = "PALISADE_CA_NAME";
    pub const TRUST_DOMAIN: &str = "PALISADE_TRUST_DOMAIN";
    pub const TRUST_ANCHORS: &str = "PALISADE_TRUST_ANCHORS";
    pub const TOKEN_FILE: &str = "PALISADE_TOKEN_FILE";
    pub const NAMESPACE: &str = "PALISADE_NAMESPACE";
    pub const SERVICE_ACCOUNT: &str = "PALISADE_SERVICE_ACCOUNT";
    pub const POD_NAME: &str = "PALISADE_POD_NAME";
    pub const POD_IP: &str = "PALISADE_POD_IP";
    pub const APP_PROBES: &str = "PALISADE_APP_PROBES";
    pub const INBOUND_LISTEN: &str = "PALISADE_INBOUND_LISTEN";
    pub const OUTBOUND_LISTEN: &str = "PALISADE_OUTBOUND_LISTEN";
    pub const ADMIN_LISTEN: &str = "PALISADE_ADMIN_LISTEN";
    pub const LOG: &str = "PALISADE_LOG";
    pub const LOG_FORMAT: &str = "PALISADE_LOG_FORMAT";
    pub const INBOUND_DETECT_TIMEOUT: &str = "PALISADE_INBOUND_DETECT_TIMEOUT";
    pub const DRAIN_TIMEOUT: &str = "PALISADE_DRAIN_TIMEOUT";
    pub const CONNECT_TIMEOUT: &str = "PALISADE_CONNECT_TIMEOUT";
    pub const HANDSHAKE_TIMEOUT: &str = "PALISADE_HANDSHAKE_TIMEOUT";
    pub const IDLE_TIMEOUT: &str = "PALISADE_IDLE_TIMEOUT";
    pub const DESTINATION_WAIT: &str = "PALISADE_DESTINATION_WAIT";
    pub const CA_TIMEOUT: &str = "PALISADE_CA_TIMEOUT";
    pub const MAX_CONNECTIONS: &str = "PALISADE_MAX_CONNECTIONS";
    pub const MAX_CONNECTIONS_PER_SOURCE: &str = "PALISADE_MAX_CONNECTIONS_PER_SOURCE";
    pub const MAX_DESTINATIONS: &str = "PALISADE_MAX_DESTINATIONS";
    pub const WORKER_THREADS: &str = "PALISADE_WORKER_THREADS";
    pub const CERT_TTL: &str = "PALISADE_CERT_TTL";
    pub const PROBE_TIMEOUT: &str = "PALISADE_PROBE_TIMEOUT";
    /// `on` (default): app connections to meshed destinations share pooled HTTP/2 tunnels;
    /// `off`: one TLS connection per app connection.
    pub const TUNNELS: &str = "PALISADE_TUNNELS";
    /// Inbound ports forwarded to the app's loopback address instead of the pod's own
    /// (comma-separated; empty for none). From the pod's
    /// `palisade.dev/inbound-loopback-ports` annotation.
    pub const INBOUND_LOOPBACK_PORTS: &str = "PALISADE_INBOUND_LOOPBACK_PORTS";
    /// `true`: `/metrics` answers callers other than loopback. From the pod's
    /// `palisade.dev/admin-remote-metrics` annotation; empty means false.
    pub const ADMIN_REMOTE_METRICS: &str = "PALISADE_ADMIN_REMOTE_METRICS";
    /// Where `init` wrote what it did and the proxy reads it (default
    /// [`INIT_REPORT_FILE`](super::INIT_REPORT_FILE)); read by both.
    pub const INIT_REPORT: &str = "PALISADE_INIT_REPORT";
    /// Test/demo mode without capture: every outbound connection goes here.
    pub const OUTBOUND_DESTINATION: &str = "PALISADE_OUTBOUND_DESTINATION";
    /// Test/demo mode without capture: every inbound connection is for this port.
    pub const INBOUND_FORWARD_PORT: &str = "PALISADE_INBOUND_FORWARD_PORT";
}

/// Where a variable's value comes from in the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// A literal value.
    Value(String),
    /// The downward API: a field path of the pod, e.g. `metadata.namespace`.
    Field(String),
}

/// What varies between meshes in an injected proxy's environment; everything else the
/// contract fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `host:port` of the CA.
    pub ca_addr: String,
    /// DNS name on the CA's serving certificate.
    pub ca_name: String,
    /// The mesh's trust domain: the proxy asks for `spiffe://<this>/ns/../sa/..`.
    pub trust_domain: String,
    /// The proxy's tracing filter.
    pub log: String,
}

impl ProxyEnv {
    /// Every variable an injected proxy gets, in a stable order.
    pub fn vars(&self) -> Vec<(&'static str, EnvSource)> {
        let value = |v: String| EnvSource::Value(v);
        let field = |path: &str| EnvSource::Field(path.to_owned());
        vec![
            (env::CA_ADDR, value(self.ca_addr.clone())),
            (env::CA_NAME, value(self.ca_name.clone())),
            (env::TRUST_DOMAIN, value(self.trust_domain.clone())),
            (
                env::TRUST_ANCHORS,
                value(format!("{TRUST_DIR}/{TRUST_ANCHORS_KEY}")),
            ),
            (
                env::TOKEN_FILE,
                value(format!("{TOKEN_DIR}/{TOKEN_FILE_NAME}")),
            ),
            (env::NAMESPACE, field("metadata.namespace")),
            (env::SERVICE_ACCOUNT, field("spec.serviceAccountName")),
            (env::POD_NAME, field("metadata.name")),
            (env::POD_IP, field("status.podIP")),
            // The original probes; empty when the pod has none to rewrite.
            (
                env::APP_PROBES,
                field(&format!("metadata.annotations['{APP_PROBES_ANNOTATION}']")),
            ),
            // The ports the pod opted back into loopback forwarding; empty for none.
            (
                env::INBOUND_LOOPBACK_PORTS,
                field(&format!("metadata.annotations['{INBOUND_LOOPBACK_PORTS}']")),
            ),
            (
                env::ADMIN_REMOTE_METRICS,
                field(&format!("metadata.annotations['{ADMIN_REMOTE_METRICS}']")),
            ),
            (
                env::INBOUND_LISTEN,
                value(format!("0.0.0.0:{INBOUND_PORT}")),
            ),
            (
                env::OUTBOUND_LISTEN,
                value(format!("127.0.0.1:{OUTBOUND_PORT}")),
            ),
            (
                env::ADMIN_LISTEN,
                value(format!("0.0.0.0:{PROXY_ADMIN_PORT}")),
            ),
            (env::LOG, value(self.log.clone())),
        ]
    }
}
