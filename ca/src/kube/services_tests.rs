use super::*;
use serde_json::json;

fn service(json: serde_json::Value) -> ServiceInfo {
    let s: KubeService = serde_json::from_value(json).unwrap();
    service_info(&s).expect("an answerable Service")
}

fn no_service(json: serde_json::Value) -> bool {
    let s: KubeService = serde_json::from_value(json).unwrap();
    service_info(&s).is_none()
}

fn slice(json: serde_json::Value) -> Option<SliceInfo> {
    let s: EndpointSlice = serde_json::from_value(json).unwrap();
    slice_info(&s)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn map(port: u16, target_port: u16) -> PortMapping {
    PortMapping { port, target_port }
}

/// `shop/api`: http 80 and metrics 9090, answering at 10.96.0.10.
fn api(publish_not_ready: bool) -> ServiceInfo {
    service(json!({
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "publishNotReadyAddresses": publish_not_ready,
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"},
                {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9090}
            ]
        }
    }))
}

/// A slice of `shop/api` with `endpoints` as `(address, ready)`; `None` leaves `ready` out.
fn api_slice(name: &str, endpoints: &[(&str, Option<bool>)]) -> SliceInfo {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(address, ready)| match ready {
            Some(r) => json!({"addresses": [address], "conditions": {"ready": r}}),
            None => json!({"addresses": [address]}),
        })
        .collect();
    slice(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "metrics", "protocol": "TCP", "port": 9090}
        ]
    }))
    .unwrap()
}

fn addresses(service: &Service) -> Vec<IpAddr> {
    service.endpoints.iter().map(|e| e.address).collect()
}

#[test]
fn a_service_gives_its_addresses_of_both_families_and_its_tcp_ports() {
    let s = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20", "fd00:10:96::20"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53}
            ]
        }
    }));
    assert_eq!((s.namespace.as_str(), s.name.as_str()), ("shop", "web"));
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.20"), ip("fd00:10:96::20")]);
    assert_eq!(
        s.ports,
        vec![NamedPort {
            name: "http".into(),
            port: 80
        }],
        "UDP ports are not the proxy's"
    );
    assert!(!s.publish_not_ready_addresses);

    let old = service(json!({
        "metadata": {"name": "old", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 5432}], "publishNotReadyAddresses": true}
    }));
    assert_eq!(old.cluster_ips, vec![ip("10.96.0.30")], "clusterIP alone");
    assert_eq!(
        old.ports,
        vec![NamedPort {
            name: String::new(),
            port: 5432
        }]
    );
    assert!(old.publish_not_ready_addresses);
}

#[test]
fn headless_external_name_and_udp_only_services_are_not_answered() {
    assert!(no_service(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
    })));
    assert!(no_service(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "", "ports": [{"port": 5432}]}
    })));
    assert!(no_service(json!({
        "metadata": {"name": "ext", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "db.example.com", "ports": [{"port": 5432}]}
    })));
    assert!(no_service(json!({
        "metadata": {"name": "dns", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "protocol": "UDP", "port": 53}]}
    })));
}

#[test]
fn a_slice_gives_its_service_addresses_readiness_and_target_ports() {
    let s = slice(json!({
        "metadata": {"name": "api-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false}},
            {"addresses": ["10.244.1.8"]},
            {"addresses": ["10.244.1.9", "fd00::9"], "conditions": {"ready": false, "serving": true, "terminating": true}}
        ],
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "dns", "protocol": "UDP", "port": 53},
            {"name": "any"}
        ]
    }))
    .unwrap();
    assert_eq!((s.namespace.as_str(), s.service.as_str()), ("shop", "api"));
    assert_eq!(
        s.endpoints,
        vec![
            SliceEndpoint {
                addresses: vec![ip("10.244.1.7")],
                ready: true
            },
            SliceEndpoint {
                addresses: vec![ip("10.244.1.8")],
                ready: true
            },
            SliceEndpoint {
                addresses: vec![ip("10.244.1.9")],
                ready: false
            },
        ],
        "absent readiness is ready; an address of the other family is not this slice's"
    );
    assert_eq!(
        s.ports,
        vec![NamedPort {
            name: "http".into(),
            port: 8080
        }]
    );
}

#[test]
fn fqdn_slices_and_slices_of_no_service_are_ignored() {
    assert!(
        slice(json!({
            "metadata": {"name": "ext-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
            "ports": [{"port": 5432}]
        }))
        .is_none()
    );
    assert!(
        slice(json!({
            "metadata": {"name": "loose", "namespace": "shop"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"port": 80}]
        }))
        .is_none()
    );
}

#[test]
fn a_service_has_the_endpoints_of_all_its_slices_sorted() {
    let a = api_slice("api-x1", &[("10.244.2.3", Some(true))]);
    let b = api_slice(
        "api-x2",
        &[("10.244.1.7", Some(true)), ("10.244.1.8", None)],
    );
    let mut elsewhere = api_slice("api-y1", &[("10.9.9.9", Some(true))]);
    elsewhere.namespace = "staging".into();
    let mut other = api_slice("web-z1", &[("10.8.8.8", Some(true))]);
    other.service = "web".into();
    let services = services_with_endpoints([&api(false)], [&a, &elsewhere, &b, &other]);
    assert_eq!(services.len(), 1);
    assert_eq!(
        addresses(&services[0]),
        vec![ip("10.244.1.7"), ip("10.244.1.8"), ip("10.244.2.3")],
        "both slices of shop/api, and only those"
    );
    assert_eq!(services[0].ports, vec![80, 9090]);
    assert_eq!(services[0].cluster_ips, vec![ip("10.96.0.10")]);
}

#[test]
fn not_ready_endpoints_are_left_out_unless_the_service_publishes_them() {
    let s = api_slice(
        "api-x1",
        &[("10.244.1.7", Some(true)), ("10.244.1.8", Some(false))],
    );
    let ready_only = services_with_endpoints([&api(false)], [&s]);
    assert_eq!(addresses(&ready_only[0]), vec![ip("10.244.1.7")]);
    let all = services_with_endpoints([&api(true)], [&s]);
    assert_eq!(addresses(&all[0]), vec![ip("10.244.1.7"), ip("10.244.1.8")]);
}

#[test]
fn slice_ports_map_from_the_service_port_of_the_same_name() {
    let s = api_slice("api-x1", &[("10.244.1.7", None)]);
    let services = services_with_endpoints([&api(false)], [&s]);
    assert_eq!(
        services[0].endpoints[0].ports,
        vec![map(80, 8080), map(9090, 9090)],
        "http's named targetPort arrives resolved as 8080"
    );

    // A single unnamed port: `name: ""` from the controller, or no name in a hand-made slice.
    let db = service(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.40", "ports": [{"port": 5432, "targetPort": 15432}]}
    }));
    for port in [json!({"name": "", "port": 15432}), json!({"port": 15432})] {
        let hand_made = slice(json!({
            "metadata": {"name": "db-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.168.10.5"]}],
            "ports": [port]
        }))
        .unwrap();
        let services = services_with_endpoints([&db], [&hand_made]);
        assert_eq!(services[0].endpoints[0].ports, vec![map(5432, 15432)]);
    }
}

#[test]
fn an_endpoint_that_serves_no_port_of_its_service_is_dropped() {
    let mut s = api_slice("api-x1", &[("10.244.1.7", Some(true))]);
    s.ports = vec![NamedPort {
        name: "grpc".into(),
        port: 7000,
    }];
    let services = services_with_endpoints([&api(false)], [&s]);
    assert!(services[0].endpoints.is_empty());
}

#[test]
fn an_address_in_two_slices_is_one_endpoint_with_the_ports_of_both() {
    let mut http = api_slice("api-x1", &[("10.244.1.7", Some(true))]);
    http.ports.retain(|p| p.name == "http");
    let mut metrics = api_slice("api-x2", &[("10.244.1.7", Some(true))]);
    metrics.ports.retain(|p| p.name == "metrics");
    let services = services_with_endpoints([&api(false)], [&http, &metrics]);
    assert_eq!(
        services[0].endpoints,
        vec![Endpoint {
            address: ip("10.244.1.7"),
            ports: vec![map(80, 8080), map(9090, 9090)],
        }]
    );
}

#[test]
fn a_dual_stack_service_answers_at_either_address_with_both_families() {
    let web = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIPs": ["10.96.0.20", "fd00:10:96::20"], "ports": [{"name": "", "port": 80}]}
    }));
    let family = |name: &str, family: &str, address: &str| {
        slice(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family,
            "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
            "ports": [{"name": "", "port": 8080}]
        }))
        .unwrap()
    };
    let v4 = family("web-v4", "IPv4", "10.244.1.20");
    let v6 = family("web-v6", "IPv6", "fd00:10:244:1::20");
    let state = crate::mesh::MeshState::new(
        "cluster.local".into(),
        Default::default(),
        Default::default(),
        Vec::new(),
        Vec::new(),
        services_with_endpoints([&web], [&v4, &v6]),
    );
    let by_v4 = state
        .service_at(ip("10.96.0.20"))
        .expect("the IPv4 address");
    let by_v6 = state
        .service_at(ip("fd00:10:96::20"))
        .expect("the IPv6 address");
    assert_eq!(by_v4, by_v6);
    assert_eq!(
        addresses(by_v4),
        vec![ip("10.244.1.20"), ip("fd00:10:244:1::20")]
    );
}
