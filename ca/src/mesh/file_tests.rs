use super::*;
use crate::mesh::Endpoint;
use palisade_ca_api::wire::{PortMapping, WatchMessageKind, WatchQuery};

const EXAMPLE: &str = r#"
trustDomain: cluster.local
defaultPolicy: all-authenticated
namespaces:
  - {name: bank, defaultPolicy: deny}
workloads:
  - {name: web, namespace: shop, serviceAccount: web, ips: [10.77.0.2], labels: {app: web}}
  - {name: api, namespace: shop, serviceAccount: api, ips: [10.77.0.3], labels: {app: api}}
  - {name: vault, namespace: bank, serviceAccount: vault, ips: [10.77.0.4]}
policies:
  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080],
           allow: [{serviceAccounts: ["shop/web"]}, {namespaces: ["monitoring"]}]}
"#;

fn parse(text: &str) -> Result<MeshState, MeshFileError> {
    parse_mesh_file(Path::new("mesh.yaml"), text, "cluster.local")
}

fn error_of(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn the_design_example_parses() {
    let state = parse(EXAMPLE).unwrap();
    assert_eq!(state.workloads().len(), 3);
    assert_eq!(state.policies().len(), 1);
    let api = state.workload_at("10.77.0.3".parse().unwrap()).unwrap();
    let inbound = state.inbound_policy(api);
    assert_eq!(inbound.workload, "shop/api");
    assert_eq!(inbound.policies.len(), 1);
    assert_eq!(inbound.policies[0].name, "shop/api-from-web");
    let vault = state.workload_at("10.77.0.4".parse().unwrap()).unwrap();
    assert_eq!(
        state.inbound_policy(vault).default_policy,
        DefaultPolicy::Deny
    );
    let web = state.workload_at("10.77.0.2".parse().unwrap()).unwrap();
    assert!(state.inbound_policy(web).policies.is_empty());
}

#[test]
fn errors_give_the_path_inside_the_file() {
    let bad_ip = EXAMPLE.replace("10.77.0.4", "10.0.0.300");
    let err = error_of(&bad_ip);
    assert!(
        err.contains("workloads[2].ips[0]") && err.contains("mesh.yaml"),
        "{err}"
    );
    for (text, path) in [
        (
            EXAMPLE.replace(
                "namespace: bank, serviceAccount",
                "namespace: Bank_1, serviceAccount",
            ),
            "workloads[2].namespace",
        ),
        (
            EXAMPLE.replace("10.77.0.4", "10.77.0.3"),
            "workloads[2].ips[0]",
        ),
        (
            EXAMPLE.replace(
                "serviceAccounts: [\"shop/web\"]",
                "serviceAccounts: [\"web\"]",
            ),
            "policies[0].spec.allow[0]",
        ),
        (
            EXAMPLE.replace("defaultPolicy: all-authenticated", "defaultPolicy: open"),
            "defaultPolicy",
        ),
        (
            EXAMPLE.replace("ports: [8080]", "ports: [0]"),
            "policies[0].spec.ports[0]",
        ),
        (
            EXAMPLE.replace("ports: [8080]", "ports: [70000]"),
            "policies[0].spec.ports[0]",
        ),
        (
            EXAMPLE.replace("labels: {app: web}", "labels: {app: web}, replicas: 2"),
            "workloads[0]",
        ),
        (
            EXAMPLE.replace("trustDomain: cluster.local", "trustDomain: other.td"),
            "trustDomain",
        ),
    ] {
        let err = error_of(&text);
        assert!(err.contains(path), "expected {path}: {err}");
    }
    assert!(error_of("workloads: {}").contains("workloads"));
}

#[test]
fn views_hold_only_what_was_asked() {
    let state = parse(EXAMPLE).unwrap();
    let q = WatchQuery {
        pod_ip: Some("10.77.0.2".parse().unwrap()),
        destinations: vec!["10.77.0.3".parse().unwrap(), "192.0.2.1".parse().unwrap()],
        ..Default::default()
    };
    let view = state.view(&q, WatchMessageKind::Snapshot, 7);
    assert_eq!(view.version, 7);
    assert_eq!(view.inbound.unwrap().workload, "shop/web");
    assert_eq!(view.destinations.len(), 2);
    assert!(view.destinations[0].meshed);
    assert_eq!(
        view.destinations[0].spiffe_id.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    assert!(!view.destinations[1].meshed);
    // An unknown pod gets no inbound policy (yet).
    let q = WatchQuery {
        pod_ip: Some("10.77.0.99".parse().unwrap()),
        destinations: vec![],
        ..Default::default()
    };
    assert!(
        state
            .view(&q, WatchMessageKind::Snapshot, 1)
            .inbound
            .is_none()
    );
}

const SERVICES: &str = r#"
trustDomain: cluster.local
workloads:
  - {name: api-1, namespace: shop, serviceAccount: api, ips: [10.77.0.3], labels: {app: api}, ports: {http: 8080}}
  - {name: api-2, namespace: shop, serviceAccount: api, ips: [10.77.0.4, "fd00:77::4"], labels: {app: api}, ports: {http: 9090}}
  - {name: api-old, namespace: shop, serviceAccount: api, ips: [10.77.0.5], labels: {app: api}}
  - {name: api-elsewhere, namespace: bank, serviceAccount: api, ips: [10.77.0.6], labels: {app: api}}
services:
  - name: api
    namespace: shop
    clusterIPs: [10.96.0.10, "fd00:96::10"]
    selector: {app: api}
    ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 9000, targetPort: 9001}]
  - name: legacy
    namespace: shop
    clusterIPs: [10.96.0.11]
    ports: [{port: 5432}]
    endpoints: [{ip: 10.77.0.9}, {ip: 10.77.0.3}]
  - name: empty
    namespace: shop
    clusterIPs: [10.96.0.12]
    selector: {app: nothing}
    ports: [{port: 80, targetPort: 8080}]
  - name: headless
    namespace: shop
    selector: {app: api}
    ports: [{port: 80}]
"#;

fn service_view(state: &MeshState, ip: &str) -> palisade_ca_api::wire::ServiceAnswer {
    state
        .destination(ip.parse().unwrap(), None)
        .service
        .unwrap_or_else(|| panic!("{ip} answers a Service"))
}

#[test]
fn services_get_the_endpoints_their_selector_picks_with_named_ports_resolved() {
    let state = parse(SERVICES).unwrap();
    let api = service_view(&state, "10.96.0.10");
    assert_eq!(api.name, "shop/api");
    assert_eq!(api.ports, vec![80, 9000]);
    let by_ip: Vec<(String, Option<u16>, Option<u16>)> = api
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.target_port(80),
                e.target_port(9000),
            )
        })
        .collect();
    assert_eq!(
        by_ip,
        vec![
            ("10.77.0.3".into(), Some(8080), Some(9001)),
            ("10.77.0.4".into(), Some(9090), Some(9001)),
            // No `http` port: serves only the numeric target, as the EndpointSlice controller.
            ("10.77.0.5".into(), None, Some(9001)),
            ("fd00:77::4".into(), Some(9090), Some(9001)),
        ],
        "bank/api-elsewhere is in another namespace"
    );
    assert!(api.endpoints.iter().all(|e| e.meshed
        && e.spiffe_id.as_ref().unwrap().to_string() == "spiffe://cluster.local/ns/shop/sa/api"));
    assert_eq!(
        service_view(&state, "fd00:96::10"),
        api,
        "every clusterIP answers the same"
    );

    let legacy = service_view(&state, "10.96.0.11");
    assert_eq!(legacy.endpoints.len(), 2);
    let plain = legacy
        .endpoints
        .iter()
        .find(|e| e.address.to_string() == "10.77.0.9")
        .unwrap();
    assert!(!plain.meshed && plain.spiffe_id.is_none());
    assert_eq!(plain.target_port(5432), Some(5432));
    assert!(
        legacy.endpoints.iter().any(|e| e.meshed),
        "a workload's address is meshed"
    );

    let empty = service_view(&state, "10.96.0.12");
    assert!(empty.endpoints.is_empty());
    assert_eq!(empty.total_endpoints, 0);
    // A pod address still answers as before.
    let pod = state.destination("10.77.0.3".parse().unwrap(), None);
    assert!(pod.meshed && pod.service.is_none());
}

#[test]
fn bad_service_entries_say_where_and_what_to_write() {
    for (from, to, path, hint) in [
        (
            "clusterIPs: [10.96.0.11]",
            "clusterIPs: [10.96.0.10]",
            "services[1].clusterIPs[0]",
            "already a clusterIP of services[0]",
        ),
        (
            "clusterIPs: [10.96.0.11]",
            "clusterIPs: [10.77.0.4]",
            "services[1].clusterIPs[0]",
            "address of workloads[1]",
        ),
        (
            "ports: [{port: 5432}]",
            "ports: []",
            "services[1].ports",
            "at least one",
        ),
        (
            "ports: [{port: 5432}]",
            "ports: [{port: 5432, targetPort: pg}]",
            "services[1].ports[0].targetPort",
            "no selector",
        ),
        (
            "{name: admin, port: 9000",
            "{port: 9000",
            "services[0].ports[1].name",
            "must name each one",
        ),
        (
            "{name: admin, port: 9000",
            "{name: admin, port: 80",
            "services[0].ports[1].port",
            "already",
        ),
        (
            "targetPort: 9001}",
            "targetPort: 0}",
            "services[0].ports[1].targetPort",
            "0 is not a port",
        ),
        (
            "name: legacy",
            "name: Legacy_DB",
            "services[1].name",
            "Service name",
        ),
        (
            "    selector: {app: nothing}\n",
            "    selector: {app: nothing}\n    endpoints: [{ip: 10.77.0.9}]\n",
            "services[2].endpoints",
            "remove",
        ),
        (
            "endpoints: [{ip: 10.77.0.9}, {ip: 10.77.0.3}]",
            "endpoints: [{ip: 10.77.0.9}, {ip: 10.77.0.9}]",
            "services[1].endpoints[1].ip",
            "twice",
        ),
        (
            "ports: [{port: 5432}]",
            "ports: [{port: 5432}]\n    weight: 3",
            "services[1]",
            "unknown field",
        ),
        (
            "ports: {http: 8080}",
            "ports: {http: 0}",
            "workloads[0].ports.http",
            "0 is not a port",
        ),
    ] {
        assert!(SERVICES.contains(from), "{from}");
        let err = error_of(&SERVICES.replacen(from, to, 1));
        assert!(
            err.contains(path) && err.contains(hint),
            "expected {path} / {hint}: {err}"
        );
    }
}

#[test]
fn a_large_service_is_answered_with_a_stable_per_asker_subset() {
    use palisade_ca_api::wire::MAX_SERVICE_ENDPOINTS;
    let endpoints: Vec<Endpoint> = (0..5_000u32)
        .map(|i| Endpoint {
            address: IpAddr::from((0x0a40_0000 + i).to_be_bytes()),
            ports: vec![PortMapping {
                port: 80,
                target_port: 8080,
            }],
        })
        .collect();
    let asker = |i: u8| Some(IpAddr::from([10, 77, 0, i]));
    let a = crate::mesh::subset(&endpoints, asker(2), MAX_SERVICE_ENDPOINTS);
    assert_eq!(a.len(), MAX_SERVICE_ENDPOINTS);
    assert!(a.windows(2).all(|w| w[0].address < w[1].address), "sorted");
    assert_eq!(
        a,
        crate::mesh::subset(&endpoints, asker(2), MAX_SERVICE_ENDPOINTS),
        "stable"
    );
    let b = crate::mesh::subset(&endpoints, asker(3), MAX_SERVICE_ENDPOINTS);
    let shared = a.iter().filter(|e| b.contains(e)).count();
    assert!(
        shared < MAX_SERVICE_ENDPOINTS / 4,
        "askers get different subsets: {shared} shared"
    );
    // Removing one endpoint outside the subset changes nothing; inside, one member.
    let removed = a[0].address;
    let fewer: Vec<Endpoint> = endpoints
        .iter()
        .filter(|e| e.address != removed)
        .cloned()
        .collect();
    let c = crate::mesh::subset(&fewer, asker(2), MAX_SERVICE_ENDPOINTS);
    assert_eq!(
        c.iter().filter(|e| a.contains(e)).count(),
        MAX_SERVICE_ENDPOINTS - 1
    );
    // Every endpoint of the Service is somebody's: 100 askers cover almost all of them.
    let mut covered = std::collections::HashSet::new();
    for i in 0..100u8 {
        covered.extend(
            crate::mesh::subset(&endpoints, asker(i), MAX_SERVICE_ENDPOINTS)
                .iter()
                .map(|e| e.address),
        );
    }
    assert!(covered.len() > 4_900, "{} of 5000 covered", covered.len());
}
