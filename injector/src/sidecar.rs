//! The objects the injector adds to a pod: `palisade-init`, the proxy container and its two
//! volumes. Written as JSON literals so that they read like the manifests in docs/injector.md;
//! the Python tests validate them against the Kubernetes schema.

use serde_json::value::RawValue;
use serde_json::{Value, json};

use palisade_ca_api::contract::{
    EnvSource, INBOUND_PORT, INIT_REPORT_DIR, OUTBOUND_PORT, PROXY_ADMIN_PORT as ADMIN_PORT,
    PROXY_UID, ProxyEnv, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_EXPIRATION_SECONDS, TOKEN_FILE_NAME,
    TRUST_ANCHORS_CONFIGMAP, TRUST_ANCHORS_KEY, TRUST_DIR,
};

use crate::annotations::{PodOverrides, Quantity};

/// Names of the injected objects (the ports, paths and names they share with the proxy and the
/// CA are in `palisade_ca_api::contract`).
pub use palisade_ca_api::contract::PROXY_CONTAINER;
pub const INIT_CONTAINER: &str = "palisade-init";
pub const TOKEN_VOLUME: &str = "palisade-token";
pub const TRUST_VOLUME: &str = "palisade-trust-anchors";
/// Where init reports what it captured, for the proxy's `/ready`.
pub const INIT_REPORT_VOLUME: &str = "palisade-init-report";

/// What every injected proxy gets unless a pod overrides it (validated by the settings).
#[derive(Debug, Clone)]
pub struct SidecarDefaults {
    pub proxy_image: String,
    /// `host:port` of the CA, for `PALISADE_CA_ADDR`.
    pub ca_addr: String,
    /// DNS name the proxy verifies on the CA's certificate, for `PALISADE_CA_NAME`.
    pub ca_name: String,
    /// The mesh's trust domain, for `PALISADE_TRUST_DOMAIN`: it must be the CA's, or the CA
    /// refuses every certificate request.
    pub trust_domain: String,
    /// The proxy as a native sidecar (init container with `restartPolicy: Always`) or, for
    /// clusters before Kubernetes 1.29, as the first regular container.
    pub native_sidecar: bool,
    /// `PALISADE_LOG` unless the pod's `palisade.dev/log-level` says otherwise.
    pub log_level: String,
}

impl SidecarDefaults {
    /// The environment of an injected proxy, with `log` as its filter.
    pub fn proxy_env(&self, log: &str) -> ProxyEnv {
        ProxyEnv {
            ca_addr: self.ca_addr.clone(),
            ca_name: self.ca_name.clone(),
            trust_domain: self.trust_domain.clone(),
            log: log.to_owned(),
        }
    }
}

/// The proxy's resources for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: Quantity,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
}

/// Everything that varies per pod in the injected objects.
#[derive(Debug, Clone)]
pub struct SidecarSpec<'a> {
    pub settings: &'a SidecarDefaults,
    pub overrides: &'a PodOverrides,
    pub resources: ProxyResources,
}

/// The four injected objects, serialised.
#[derive(Debug, Clone)]
pub struct Prebuilt {
    pub init: Box<RawValue>,
    pub proxy: Box<RawValue>,
    pub token_volume: Box<RawValue>,
    pub trust_volume: Box<RawValue>,
    pub report_volume: Box<RawValue>,
}

/// A JSON value as raw text; a `Value` always serialises.
pub fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| empty_object())
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).unwrap_or_default()
}

impl Default for Prebuilt {
    fn default() -> Self {
        Self {
            init: empty_object(),
            proxy: empty_object(),
            token_volume: empty_object(),
            trust_volume: empty_object(),
            report_volume: empty_object(),
        }
    }
}

impl Prebuilt {
    pub fn new(
        settings: &SidecarDefaults,
        overrides: &PodOverrides,
        resources: ProxyResources,
    ) -> Self {
        let spec = SidecarSpec {
            settings,
            overrides,
            resources,
        };
        Self {
            init: raw(&init_container(&spec)),
            proxy: raw(&proxy_container(&spec)),
            token_volume: raw(&token_volume()),
            trust_volume: raw(&trust_volume()),
            report_volume: raw(&report_volume()),
        }
    }
}

fn resources_json(r: &ProxyResources) -> Value {
    let mut limits = serde_json::Map::new();
    limits.insert("memory".into(), r.memory_limit.text.clone().into());
    if let Some(cpu) = &r.cpu_limit {
        limits.insert("cpu".into(), cpu.text.clone().into());
    }
    json!({
        "requests": {"cpu": r.cpu_request.text, "memory": r.memory_request.text},
        "limits": limits,
    })
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `palisade-proxy init …`: the capture rules. The admin port is always skipped inbound so
/// that the kubelet's probes reach the proxy itself rather than the capture listener.
pub fn init_container(spec: &SidecarSpec<'_>) -> Value {
    let mut skip_inbound = vec![ADMIN_PORT];
    skip_inbound.extend(&spec.overrides.skip_inbound_ports);
    skip_inbound.sort_unstable();
    skip_inbound.dedup();
    let mut command = vec![
        "palisade-proxy".to_owned(),
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--skip-inbound-ports".to_owned(),
        join(&skip_inbound),
    ];
    if !spec.overrides.skip_outbound_ports.is_empty() {
        command.push("--skip-outbound-ports".to_owned());
        command.push(join(&spec.overrides.skip_outbound_ports));
    }
    if !spec.overrides.skip_outbound_cidrs.is_empty() {
        command.push("--skip-outbound-cidrs".to_owned());
        command.push(join(&spec.overrides.skip_outbound_cidrs));
    }
    if !spec.overrides.inbound_udp_ports.is_empty() {
        command.push("--allow-inbound-udp-ports".to_owned());
        command.push(join(&spec.overrides.inbound_udp_ports));
    }
    json!({
        "name": INIT_CONTAINER,
        "image": spec.settings.proxy_image,
        "command": command,
        "resources": resources_json(&spec.resources),
        "volumeMounts": [{"name": INIT_REPORT_VOLUME, "mountPath": INIT_REPORT_DIR}],
        // iptables needs root and these two capabilities, nothing more; its lock file lives
        // under /run, so the root filesystem stays writable for this short-lived container.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    })
}

/// The proxy's environment as Kubernetes `env` entries: exactly the contract's [`ProxyEnv`],
/// so a variable the proxy requires cannot be missing.
///
/// [`ProxyEnv`]: palisade_ca_api::contract::ProxyEnv
fn env_json(spec: &SidecarSpec<'_>) -> Value {
    let log = spec
        .overrides
        .log_level
        .as_deref()
        .unwrap_or(&spec.settings.log_level);
    let vars = spec.settings.proxy_env(log).vars();
    let entries = vars.into_iter().map(|(name, source)| match source {
        EnvSource::Value(value) => json!({"name": name, "value": value}),
        EnvSource::Field(path) => json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}),
    });
    Value::Array(entries.collect())
}

fn ready_probe(period: i32, failures: i32) -> Value {
    json!({
        "httpGet": {"path": "/ready", "port": ADMIN_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    })
}

/// `palisade-proxy run`, configured by the `PALISADE_*` variables of DESIGN.md.
pub fn proxy_container(spec: &SidecarSpec<'_>) -> Value {
    let s = spec.settings;
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": s.proxy_image,
        "command": ["palisade-proxy", "run"],
        "env": env_json(spec),
        "ports": [{"name": "palisade-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "readinessProbe": ready_probe(2, 3),
        "resources": resources_json(&spec.resources),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true},
            {"name": INIT_REPORT_VOLUME, "mountPath": INIT_REPORT_DIR, "readOnly": true},
        ],
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    let object = container
        .as_object_mut()
        .expect("a json! object literal is an object");
    if s.native_sidecar {
        // The kubelet starts the next init container only once this probe passes, so the
        // app's own init containers already run with a ready proxy.
        object.insert("restartPolicy".into(), "Always".into());
        object.insert("startupProbe".into(), ready_probe(1, 300));
    } else {
        // The kubelet starts containers in order and waits for each postStart hook.
        object.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": ["palisade-proxy", "wait-ready"]}}}),
        );
    }
    container
}

pub fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": TOKEN_FILE_NAME,
        }}]},
    })
}

/// A few lines of text in memory: nothing of it outlives the pod.
pub fn report_volume() -> Value {
    json!({
        "name": INIT_REPORT_VOLUME,
        "emptyDir": {"medium": "Memory", "sizeLimit": "64Ki"},
    })
}

pub fn trust_volume() -> Value {
    json!({
        "name": TRUST_VOLUME,
        "configMap": {
            "name": TRUST_ANCHORS_CONFIGMAP,
            "items": [{"key": TRUST_ANCHORS_KEY, "path": TRUST_ANCHORS_KEY}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{InjectorSettings, RawSettings};

    fn spec_with<'a>(
        settings: &'a InjectorSettings,
        overrides: &'a PodOverrides,
    ) -> SidecarSpec<'a> {
        SidecarSpec {
            settings: &settings.sidecar,
            overrides,
            resources: settings.resources(None, None).unwrap(),
        }
    }

    #[test]
    fn init_always_skips_the_admin_port_and_passes_overrides() {
        let settings = RawSettings::default().validate().unwrap();
        let overrides = PodOverrides {
            skip_inbound_ports: vec![22, 15021],
            skip_outbound_ports: vec![5432],
            skip_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            inbound_udp_ports: vec![5353],
            ..PodOverrides::default()
        };
        let init = init_container(&spec_with(&settings, &overrides));
        assert_eq!(
            init["command"],
            json!([
                "palisade-proxy",
                "init",
                "--proxy-uid",
                "1337",
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001",
                "--skip-inbound-ports",
                "22,15021",
                "--skip-outbound-ports",
                "5432",
                "--skip-outbound-cidrs",
                "10.0.0.0/8",
                "--allow-inbound-udp-ports",
                "5353"
            ])
        );
        assert_eq!(
            init["securityContext"]["capabilities"],
            json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
        );
    }

    #[test]
    fn init_without_overrides_has_no_empty_flags() {
        let settings = RawSettings::default().validate().unwrap();
        let overrides = PodOverrides::default();
        let init = init_container(&spec_with(&settings, &overrides));
        let command: Vec<&str> = init["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(!command.contains(&"--skip-outbound-ports"));
        assert!(!command.contains(&"--skip-outbound-cidrs"));
        assert!(!command.contains(&"--allow-inbound-udp-ports"));
        assert!(command.ends_with(&["--skip-inbound-ports", "15021"]));
    }

    #[test]
    fn native_sidecar_has_restart_policy_and_startup_probe() {
        let settings = RawSettings::default().validate().unwrap();
        let overrides = PodOverrides::default();
        let proxy = proxy_container(&spec_with(&settings, &overrides));
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert!(proxy.get("lifecycle").is_none());
    }

    #[test]
    fn classic_sidecar_waits_for_readiness_in_post_start() {
        let settings = RawSettings {
            native_sidecar: false,
            ..RawSettings::default()
        }
        .validate()
        .unwrap();
        let overrides = PodOverrides::default();
        let proxy = proxy_container(&spec_with(&settings, &overrides));
        assert!(proxy.get("restartPolicy").is_none());
        assert_eq!(
            proxy["lifecycle"]["postStart"]["exec"]["command"],
            json!(["palisade-proxy", "wait-ready"])
        );
    }

    #[test]
    fn proxy_log_level_comes_from_the_override() {
        let settings = RawSettings::default().validate().unwrap();
        let overrides = PodOverrides {
            log_level: Some("debug".into()),
            ..PodOverrides::default()
        };
        let proxy = proxy_container(&spec_with(&settings, &overrides));
        let log = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PALISADE_LOG")
            .unwrap();
        assert_eq!(log["value"], "debug");
    }

    #[test]
    fn prebuilt_objects_are_the_ones_built_per_pod() {
        for native_sidecar in [true, false] {
            let settings = RawSettings {
                native_sidecar,
                ..RawSettings::default()
            }
            .validate()
            .unwrap();
            let overrides = PodOverrides::default();
            let spec = spec_with(&settings, &overrides);
            let parse = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).unwrap();
            let prebuilt = &settings.prebuilt;
            assert_eq!(parse(&prebuilt.init), init_container(&spec));
            assert_eq!(parse(&prebuilt.proxy), proxy_container(&spec));
            assert_eq!(parse(&prebuilt.token_volume), token_volume());
            assert_eq!(parse(&prebuilt.trust_volume), trust_volume());
        }
    }

    /// The first wave injected no trust domain, so a mesh outside cluster.local never got a
    /// certificate: the proxy must be told the injector's.
    #[test]
    fn proxy_gets_the_injectors_trust_domain() {
        let settings = RawSettings {
            trust_domain: "prod.example.org".into(),
            ..RawSettings::default()
        }
        .validate()
        .unwrap();
        let overrides = PodOverrides::default();
        let proxy = proxy_container(&spec_with(&settings, &overrides));
        let env = proxy["env"].as_array().unwrap();
        let trust_domain = env
            .iter()
            .find(|e| e["name"] == "PALISADE_TRUST_DOMAIN")
            .expect("PALISADE_TRUST_DOMAIN is injected");
        assert_eq!(trust_domain["value"], "prod.example.org");
    }

    #[test]
    fn proxy_reads_the_probe_record_through_the_downward_api() {
        let settings = RawSettings::default().validate().unwrap();
        let overrides = PodOverrides::default();
        let proxy = proxy_container(&spec_with(&settings, &overrides));
        let probes = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PALISADE_APP_PROBES")
            .unwrap();
        assert_eq!(
            probes["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['palisade.dev/app-probes']"
        );
    }
}
