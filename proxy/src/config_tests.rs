use super::*;

fn base() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        ("PALISADE_CA_ADDR", "palisade-ca.palisade-system.svc:15012"),
        ("PALISADE_TRUST_ANCHORS", "/var/run/palisade/trust/ca.pem"),
        ("PALISADE_TOKEN_FILE", "/var/run/palisade/token/token"),
        ("PALISADE_NAMESPACE", "shop"),
        ("PALISADE_SERVICE_ACCOUNT", "web"),
        ("PALISADE_POD_IP", "10.77.0.2"),
    ])
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = Config::from_env(&base()).unwrap();
    assert_eq!(
        c.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(c.ca_name, "palisade-ca.palisade-system.svc");
    assert_eq!(c.inbound_listen, "0.0.0.0:15006".parse().unwrap());
    assert_eq!(c.outbound_listen, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(c.admin_listen, "0.0.0.0:15021".parse().unwrap());
    assert_eq!(c.inbound_detect_timeout, Duration::from_millis(200));
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.max_destinations, 256);
    assert_eq!(c.worker_threads, 1);
    assert!(c.app_probes.is_empty());
    assert!(c.outbound_destination.is_none());
    assert!(c.tunnels, "tunnels are on unless PALISADE_TUNNELS=off");
}

#[test]
fn tunnels_are_switched_by_on_or_off() {
    let mut env = base();
    env.insert("PALISADE_TUNNELS", "off");
    assert!(!Config::from_env(&env).unwrap().tunnels);
    env.insert("PALISADE_TUNNELS", "on");
    assert!(Config::from_env(&env).unwrap().tunnels);
    env.insert("PALISADE_TUNNELS", "yes");
    let err = Config::from_env(&env).unwrap_err().to_string();
    assert!(
        err.contains("PALISADE_TUNNELS") && err.contains("\"yes\""),
        "{err}"
    );
}

#[test]
fn missing_required_variables_are_named() {
    for name in [
        "PALISADE_CA_ADDR",
        "PALISADE_TRUST_ANCHORS",
        "PALISADE_TOKEN_FILE",
        "PALISADE_NAMESPACE",
        "PALISADE_SERVICE_ACCOUNT",
        "PALISADE_POD_IP",
    ] {
        let mut env = base();
        env.remove(name);
        let err = Config::from_env(&env).unwrap_err();
        assert!(
            matches!(err, ConfigError::Missing { name: n, .. } if n == name),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name));
    }
}

#[test]
fn every_malformed_variable_is_named_with_its_value() {
    let cases: &[(&str, &str)] = &[
        ("PALISADE_CA_ADDR", "no-port"),
        ("PALISADE_CA_ADDR", "host:99999"),
        ("PALISADE_CA_NAME", "not a name!"),
        ("PALISADE_NAMESPACE", "Shop_Upper"),
        ("PALISADE_SERVICE_ACCOUNT", "-bad-"),
        ("PALISADE_TRUST_DOMAIN", "has space"),
        ("PALISADE_POD_IP", "10.0.0.300"),
        ("PALISADE_INBOUND_LISTEN", "15006"),
        ("PALISADE_OUTBOUND_LISTEN", "localhost:15001"),
        ("PALISADE_ADMIN_LISTEN", "0.0.0.0:99999"),
        ("PALISADE_LOG", "palisade=[[[bad"),
        ("PALISADE_LOG_FORMAT", "xml"),
        ("PALISADE_INBOUND_DETECT_TIMEOUT", "200"),
        ("PALISADE_INBOUND_DETECT_TIMEOUT", "1h"),
        ("PALISADE_DRAIN_TIMEOUT", "soon"),
        ("PALISADE_CONNECT_TIMEOUT", "0s"),
        ("PALISADE_HANDSHAKE_TIMEOUT", "5 seconds"),
        ("PALISADE_IDLE_TIMEOUT", "-1s"),
        ("PALISADE_DESTINATION_WAIT", "2 days"),
        ("PALISADE_CA_TIMEOUT", "x"),
        ("PALISADE_MAX_CONNECTIONS", "0"),
        ("PALISADE_MAX_CONNECTIONS", "many"),
        ("PALISADE_MAX_DESTINATIONS", "257"),
        ("PALISADE_WORKER_THREADS", "0"),
        ("PALISADE_CERT_TTL", "1m"),
        ("PALISADE_CERT_TTL", "48h"),
        ("PALISADE_PROBE_TIMEOUT", "1"),
        ("PALISADE_APP_PROBES", "{not json"),
        (
            "PALISADE_APP_PROBES",
            r#"{"web": {"tcpSocket": {"port": 80}}}"#,
        ),
        ("PALISADE_OUTBOUND_DESTINATION", "nowhere"),
        ("PALISADE_INBOUND_FORWARD_PORT", "0"),
    ];
    for (name, value) in cases {
        let mut env = base();
        env.insert(name, value);
        let err = Config::from_env(&env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(name), "{name}={value}: {text}");
        assert!(
            matches!(err, ConfigError::Invalid { .. }),
            "{name}={value}: {text}"
        );
    }
}

#[test]
fn listeners_must_not_share_a_port() {
    let mut env = base();
    env.insert("PALISADE_ADMIN_LISTEN", "0.0.0.0:15006");
    let err = Config::from_env(&env).unwrap_err().to_string();
    assert!(err.contains("same port"), "{err}");
}

#[test]
fn the_per_source_cap_cannot_exceed_the_total() {
    let mut env = base();
    env.insert("PALISADE_MAX_CONNECTIONS", "100");
    env.insert("PALISADE_MAX_CONNECTIONS_PER_SOURCE", "200");
    let err = Config::from_env(&env).unwrap_err().to_string();
    assert!(
        err.contains("PALISADE_MAX_CONNECTIONS_PER_SOURCE") && err.contains("lower it"),
        "{err}"
    );
    env.insert("PALISADE_MAX_CONNECTIONS_PER_SOURCE", "100");
    assert_eq!(
        Config::from_env(&env).unwrap().max_connections_per_source,
        100
    );
    env.remove("PALISADE_MAX_CONNECTIONS");
    env.remove("PALISADE_MAX_CONNECTIONS_PER_SOURCE");
    assert_eq!(
        Config::from_env(&env).unwrap().max_connections_per_source,
        1024
    );
}

/// Exactly what the injector sets, with the pod's fields filled in as the kubelet would, is a
/// valid configuration, and the proxy asks for an identity in the injector's trust domain.
#[test]
fn the_injected_environment_is_a_valid_config() {
    use palisade_ca_api::contract::{EnvSource, ProxyEnv};
    let injected = ProxyEnv {
        ca_addr: "palisade-ca.mesh-control.svc:15012".into(),
        ca_name: "palisade-ca.mesh-control.svc".into(),
        trust_domain: "prod.example.org".into(),
        log: "debug".into(),
    };
    let pod = HashMap::from([
        ("metadata.namespace", "shop"),
        ("spec.serviceAccountName", "web"),
        ("metadata.name", "web-0"),
        ("status.podIP", "10.77.0.2"),
        ("metadata.annotations['palisade.dev/app-probes']", ""),
        (
            "metadata.annotations['palisade.dev/inbound-loopback-ports']",
            "9090",
        ),
        (
            "metadata.annotations['palisade.dev/admin-remote-metrics']",
            "",
        ),
    ]);
    let env: HashMap<String, String> = injected
        .vars()
        .into_iter()
        .map(|(name, source)| {
            let value = match source {
                EnvSource::Value(v) => v,
                EnvSource::Field(path) => pod[path.as_str()].to_owned(),
            };
            (name.to_owned(), value)
        })
        .collect();
    let c = Config::from_env(&env).unwrap();
    assert_eq!(
        c.spiffe_id.to_string(),
        "spiffe://prod.example.org/ns/shop/sa/web"
    );
    assert_eq!(c.ca_name, "palisade-ca.mesh-control.svc");
    assert_eq!(c.log, "debug");
    assert_eq!(c.inbound_loopback_ports, vec![9090]);
    assert!(!c.admin_remote_metrics, "an absent annotation is off");
}

#[test]
fn ipv6_addresses_are_read_wherever_an_address_is() {
    let mut env = base();
    env.insert("PALISADE_POD_IP", "fd00:77::3");
    env.insert("PALISADE_CA_ADDR", "[fd00:77::1]:15012");
    env.insert("PALISADE_INBOUND_LISTEN", "[::]:15006");
    env.insert("PALISADE_OUTBOUND_LISTEN", "[::1]:15001");
    let c = Config::from_env(&env).unwrap();
    assert_eq!(c.pod_ip, "fd00:77::3".parse::<IpAddr>().unwrap());
    assert_eq!(c.inbound_listen, "[::]:15006".parse().unwrap());
    assert_eq!(c.outbound_listen, "[::1]:15001".parse().unwrap());
    env.insert("PALISADE_POD_IP", "[fd00:77::3]");
    let e = Config::from_env(&env).unwrap_err().to_string();
    assert!(e.contains("PALISADE_POD_IP"), "{e}");
}
