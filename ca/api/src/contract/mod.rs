//! The contract between the CA, the injector, `palisade-init` and the proxy (DESIGN.md): every
//! port, uid, label, annotation, ConfigMap, token audience and `PALISADE_*` variable that more
//! than one part must agree on, and the one parser of each value form they exchange. Written
//! once here so that a change reaches every side together.

mod parse;
mod probes;
mod proxy_env;

pub use parse::{Cidr, format_duration, parse_cidrs, parse_duration, parse_ports, parse_switch};
pub use probes::{AppProbe, AppProbes, Grpc, Header, HttpGet, PROBE_KINDS, TcpSocket};
pub use probes::{app_health_path, parse_probes};
pub use proxy_env::{EnvSource, ProxyEnv, env};

/// The proxy's uid: its own traffic is never captured.
pub const PROXY_UID: u32 = 1337;
/// Where captured inbound TCP is redirected.
pub const INBOUND_PORT: u16 = 15006;
/// Where captured outbound TCP is redirected.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's admin port (`/ready`, `/app-health/...`): never captured, so kubelet probes
/// reach the proxy itself.
pub const PROXY_ADMIN_PORT: u16 = 15021;
/// The CA's API port.
pub const CA_PORT: u16 = 15012;
/// The admin port of the CA and of the injector (`/ready`, `/live`, `/metrics`).
pub const CONTROL_PLANE_ADMIN_PORT: u16 = 15014;
/// The injector's webhook port.
pub const INJECTOR_PORT: u16 = 15017;

/// The namespace the chart installs the control plane into unless told otherwise.
pub const DEFAULT_CA_NAMESPACE: &str = "palisade-system";
/// The CA's service account, Service and SPIFFE service-account name.
pub const CA_SERVICE_ACCOUNT: &str = "palisade-ca";
pub use crate::spiffe::DEFAULT_TRUST_DOMAIN;
pub use crate::wire::TOKEN_AUDIENCE;

/// `palisade-ca.<namespace>.svc`: the DNS name on the CA's serving certificate.
pub fn ca_dns_name(namespace: &str) -> String {
    format!("{CA_SERVICE_ACCOUNT}.{namespace}.svc")
}

/// `palisade-ca.<namespace>.svc:15012`: where proxies reach the CA.
pub fn ca_addr(namespace: &str) -> String {
    format!("{}:{CA_PORT}", ca_dns_name(namespace))
}

/// The label the injector puts on every pod it injects; the CA treats such pods as meshed
/// when they also carry the proxy container ([`PROXY_CONTAINER`]) and are not hostNetwork.
pub const INJECTED_LABEL: &str = "palisade.dev/injected";
/// The name of the injected proxy container (a native sidecar init container, or the first
/// container on older clusters).
pub const PROXY_CONTAINER: &str = "palisade-proxy";
/// Namespace label that opts a namespace in (`enabled`); as a pod label or annotation,
/// `disabled` opts the pod out.
pub const INJECT: &str = "palisade.dev/inject";
/// The [`INJECT`] value on a pod that opts it out.
pub const INJECT_DISABLED: &str = "disabled";

/// Whether a pod opted out of the mesh on purpose: its [`INJECT`] label or annotation (either
/// one) says `disabled`. The injector leaves such a pod alone; the CA counts it apart from pods
/// that lack the proxy by accident. One rule, so the two never disagree about a pod.
pub fn pod_opts_out(label: Option<&str>, annotation: Option<&str>) -> bool {
    label == Some(INJECT_DISABLED) || annotation == Some(INJECT_DISABLED)
}
/// Namespace annotation: the namespace's default policy.
pub const DEFAULT_POLICY_ANNOTATION: &str = "palisade.dev/default-policy";
/// Written by the injector: the app's original probes, for the proxy ([`AppProbes`]).
pub const APP_PROBES_ANNOTATION: &str = "palisade.dev/app-probes";

/// Per-pod overrides read by the injector.
pub mod annotations {
    pub const SKIP_INBOUND_PORTS: &str = "palisade.dev/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "palisade.dev/skip-outbound-ports";
    pub const SKIP_OUTBOUND_CIDRS: &str = "palisade.dev/skip-outbound-cidrs";
    /// Ports whose inbound connections go to the app's loopback listener (`127.0.0.1`), the
    /// old way, for apps that listen only there; every other port is forwarded to the pod's
    /// own address, so a loopback-only listener is not reachable through the mesh.
    pub const INBOUND_LOOPBACK_PORTS: &str = "palisade.dev/inbound-loopback-ports";
    /// `true` lets callers other than loopback read the proxy's `/metrics` (a Prometheus that
    /// scrapes pods); by default only `/ready`, `/live` and `/app-health/...` answer them.
    pub const ADMIN_REMOTE_METRICS: &str = "palisade.dev/admin-remote-metrics";
    /// Inbound UDP ports the app may be reached on; all other inbound UDP (but replies to the
    /// pod's own requests, such as DNS answers) is dropped, as policy cannot see UDP.
    pub const INBOUND_UDP_PORTS: &str = "palisade.dev/inbound-udp-ports";
    pub const PROXY_CPU_REQUEST: &str = "palisade.dev/proxy-cpu-request";
    pub const PROXY_MEMORY_LIMIT: &str = "palisade.dev/proxy-memory-limit";
    pub const LOG_LEVEL: &str = "palisade.dev/log-level";
}

/// The ConfigMap the CA publishes the trust bundle in, in every opted-in namespace, and its key.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "palisade-trust-anchors";
pub const TRUST_ANCHORS_KEY: &str = "ca.pem";
/// Lifetime of the projected service-account token the injector asks for.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Where the injected proxy finds its token and trust anchors.
pub const TOKEN_DIR: &str = "/var/run/palisade/token";
pub const TOKEN_FILE_NAME: &str = "token";
pub const TRUST_DIR: &str = "/var/run/palisade/trust";
/// A memory volume the init container writes what it did to (one line per address family) and
/// the proxy reads, to report it on `/ready`; the injector mounts it in both.
pub const INIT_REPORT_DIR: &str = "/var/run/palisade/init";
pub const INIT_REPORT_FILE: &str = "/var/run/palisade/init/report";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_opts_out_by_label_or_annotation_saying_disabled() {
        assert!(pod_opts_out(Some("disabled"), None));
        assert!(pod_opts_out(None, Some("disabled")));
        assert!(pod_opts_out(Some("enabled"), Some("disabled")));
        assert!(!pod_opts_out(None, None));
        assert!(!pod_opts_out(Some("enabled"), None));
        // Only the exact value: anything else is the injector's error to report, not an opt-out.
        assert!(!pod_opts_out(Some("Disabled"), Some("false")));
    }
}
