use super::*;
use palisade_ca_api::wire::{WatchMessageKind, WatchQuery};

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
    };
    assert!(
        state
            .view(&q, WatchMessageKind::Snapshot, 1)
            .inbound
            .is_none()
    );
}
