//! The cluster read through kube's mock service, answered with recorded API JSON
//! (`tests/fixtures/kube-live/`, and the CA's own recorded Services and EndpointSlices).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use palisade_ca_api::policy::{Caller, evaluate_inbound};

use super::*;

const POD_PAGE_1: &str = include_str!("../tests/fixtures/kube-live/pod-list-page-1.json");
const POD_PAGE_2: &str = include_str!("../tests/fixtures/kube-live/pod-list-page-2.json");
const NAMESPACES: &str = include_str!("../tests/fixtures/kube-live/namespace-list.json");
const POLICIES: &str = include_str!("../tests/fixtures/kube-live/meshpolicy-list.json");
const CA_DEPLOYMENT_JSON: &str =
    include_str!("../tests/fixtures/kube-live/deployment-palisade-ca.json");
const SERVICES: &str = include_str!("../ca/tests/fixtures/kube/service-list.json");
const SLICES: &str = include_str!("../ca/tests/fixtures/kube/endpointslice-list.json");
const FORBIDDEN: &str = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"dev\" cannot list resource \"pods\" in API group \"\" at the cluster scope","reason":"Forbidden","details":{"kind":"pods"},"code":403}"#;

/// Answers each request by its path (and for pods, its page); records every request.
fn mock_api(
    answer: impl Fn(&str, &str) -> (StatusCode, &'static str) + Send + 'static,
) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            log.lock()
                .unwrap()
                .push(format!("{} {path}?{query}", request.method()));
            let (status, body) = answer(&path, &query);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(service, "default"), seen)
}

fn cluster(path: &str, query: &str) -> (StatusCode, &'static str) {
    let ok = |body| (StatusCode::OK, body);
    match path {
        "/api/v1/pods" if query.contains("continue=") => ok(POD_PAGE_2),
        "/api/v1/pods" => ok(POD_PAGE_1),
        "/api/v1/namespaces" => ok(NAMESPACES),
        "/apis/palisade.dev/v1alpha1/meshpolicies" => ok(POLICIES),
        "/api/v1/services" => ok(SERVICES),
        "/apis/discovery.k8s.io/v1/endpointslices" => ok(SLICES),
        "/apis/apps/v1/namespaces/palisade-system/deployments/palisade-ca" => {
            ok(CA_DEPLOYMENT_JSON)
        }
        _ => (
            StatusCode::NOT_FOUND,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"not found","reason":"NotFound","code":404}"#,
        ),
    }
}

#[tokio::test]
async fn the_mesh_is_read_from_the_cluster_as_the_ca_builds_it() {
    let (client, seen) = mock_api(cluster);
    let settings = read_ca_settings(&client, "palisade-system", None, None)
        .await
        .unwrap();
    assert_eq!(
        settings,
        CaSettings {
            trust_domain: "prod.example".into(),
            default_policy: DefaultPolicy::Deny,
        }
    );
    let (state, skipped) = mesh_state(&client, &settings).await.unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    // Both pages of pods: web from the first, api and intruder from the second.
    let mut names: Vec<&str> = state.workloads().iter().map(|w| w.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "api-5c7d8f9b6-qw4rt",
            "intruder-6d8e0f1a2-mn3b7",
            "web-7f9c6d5b8-h2k9p"
        ]
    );
    let api = state
        .workload_at("10.244.1.7".parse::<IpAddr>().unwrap())
        .unwrap();
    let inbound = state.inbound_policy(api);
    assert_eq!(inbound.policies[0].name, "shop/api-from-web");
    let web = state
        .workload_at("10.244.1.20".parse::<IpAddr>().unwrap())
        .unwrap();
    let web_id = state.spiffe_id(web).unwrap();
    assert_eq!(
        web_id.to_string(),
        "spiffe://prod.example/ns/shop/sa/web",
        "the CA's trust domain"
    );
    assert!(evaluate_inbound(&inbound, 8080, Caller::Authenticated(&web_id)).allowed);
    let intruder = state
        .workload_at("10.244.2.9".parse::<IpAddr>().unwrap())
        .unwrap();
    let intruder_id = state.spiffe_id(intruder).unwrap();
    assert!(!evaluate_inbound(&inbound, 8080, Caller::Authenticated(&intruder_id)).allowed);
    assert_eq!(
        state.namespace_defaults.get("batch"),
        Some(&DefaultPolicy::Deny)
    );
    assert!(state.service_at("10.96.0.10".parse().unwrap()).is_some());
    let seen = seen.lock().unwrap().clone();
    let pods: Vec<&String> = seen.iter().filter(|r| r.contains("/api/v1/pods")).collect();
    assert_eq!(pods.len(), 2, "two pages: {seen:?}");
    assert!(
        pods[0].contains("labelSelector=palisade.dev%2Finjected%3Dtrue"),
        "only meshed pods are listed: {seen:?}"
    );
    assert!(pods[1].contains("continue=eyJ2"), "{seen:?}");
}

#[tokio::test]
async fn given_settings_win_and_no_deployment_is_read() {
    let (client, seen) = mock_api(cluster);
    let settings = read_ca_settings(
        &client,
        "palisade-system",
        Some("other.example"),
        Some(DefaultPolicy::All),
    )
    .await
    .unwrap();
    assert_eq!(settings.trust_domain, "other.example");
    assert!(seen.lock().unwrap().is_empty());
    let half = read_ca_settings(&client, "palisade-system", Some("other.example"), None)
        .await
        .unwrap();
    assert_eq!(half.trust_domain, "other.example");
    assert_eq!(
        half.default_policy,
        DefaultPolicy::Deny,
        "from the Deployment"
    );
}

#[tokio::test]
async fn refusals_and_a_missing_ca_say_what_to_do() {
    let (client, _) = mock_api(|path, query| match path {
        "/api/v1/pods" => (StatusCode::FORBIDDEN, FORBIDDEN),
        _ => cluster(path, query),
    });
    let settings = CaSettings {
        trust_domain: "cluster.local".into(),
        default_policy: DefaultPolicy::AllAuthenticated,
    };
    let e = mesh_state(&client, &settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused to list pods") && e.contains("docs/rbac.md"),
        "{e}"
    );
    let e = read_ca_settings(&client, "mesh", None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no Deployment mesh/palisade-ca") && e.contains("--ca-namespace"),
        "{e}"
    );
    let (client, _) = mock_api(|path, query| match path {
        "/apis/palisade.dev/v1alpha1/meshpolicies" => (
            StatusCode::NOT_FOUND,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#,
        ),
        _ => cluster(path, query),
    });
    let e = mesh_state(&client, &settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("install Palisade's CRD"), "{e}");
}

#[test]
fn the_ca_settings_are_its_flags_then_its_environment_then_its_defaults() {
    let mut d: Deployment = serde_json::from_str(CA_DEPLOYMENT_JSON).unwrap();
    let container = &mut d.spec.template.spec.as_mut().unwrap().containers[0];
    container.args = Some(vec![
        "serve".into(),
        "--trust-domain=inline.example".into(),
        "--default-policy".into(),
        "all".into(),
    ]);
    let s = ca_settings(&d).unwrap();
    assert_eq!(s.trust_domain, "inline.example");
    assert_eq!(
        s.default_policy,
        DefaultPolicy::All,
        "the flag over the env"
    );
    let container = &mut d.spec.template.spec.as_mut().unwrap().containers[0];
    container.args = Some(vec!["serve".into()]);
    container.env = None;
    assert_eq!(
        ca_settings(&d).unwrap(),
        CaSettings {
            trust_domain: "cluster.local".into(),
            default_policy: DefaultPolicy::AllAuthenticated
        }
    );
    let container = &mut d.spec.template.spec.as_mut().unwrap().containers[0];
    container.args = Some(vec!["--default-policy".into(), "allow-all".into()]);
    let e = ca_settings(&d).unwrap_err().to_string();
    assert!(e.contains("\"allow-all\" is not one the CA accepts"), "{e}");
    container_named(&mut d, "sidecar");
    let e = ca_settings(&d).unwrap_err().to_string();
    assert!(e.contains("has no container palisade-ca"), "{e}");
}

fn container_named(d: &mut Deployment, name: &str) {
    d.spec.template.spec.as_mut().unwrap().containers[0].name = name.into();
}

#[tokio::test]
async fn an_object_that_does_not_decode_is_skipped_by_name_and_the_rest_is_read() {
    let mut policies: serde_json::Value = serde_json::from_str(POLICIES).unwrap();
    let mut bad = policies["items"][0].clone();
    bad["metadata"]["name"] = "broken".into();
    bad["spec"]["ports"] = serde_json::json!(["eighty"]);
    policies["items"].as_array_mut().unwrap().push(bad);
    let text: &'static str = Box::leak(policies.to_string().into_boxed_str());
    let (client, _) = mock_api(move |path, query| match path {
        "/apis/palisade.dev/v1alpha1/meshpolicies" => (StatusCode::OK, text),
        _ => cluster(path, query),
    });
    let settings = read_ca_settings(&client, "palisade-system", None, None)
        .await
        .unwrap();
    let (state, skipped) = mesh_state(&client, &settings).await.unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(
        (skipped[0].kind, skipped[0].name.as_str()),
        ("meshpolicies", "shop/broken")
    );
    let api = state
        .workload_at("10.244.1.7".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(state.inbound_policy(api).policies.len(), 1);
}

#[tokio::test]
async fn the_proxies_that_answer_remote_callers_are_asked_and_the_others_named_with_the_fix() {
    let mut page: serde_json::Value = serde_json::from_str(POD_PAGE_2).unwrap();
    let remote = palisade_ca_api::contract::annotations::ADMIN_REMOTE_METRICS;
    // api answers remote callers; intruder does not; a third pod times out.
    page["items"][0]["metadata"]["annotations"] = serde_json::json!({ remote: "true" });
    let mut slow = page["items"][0].clone();
    slow["metadata"]["name"] = "api-5c7d8f9b6-slow1".into();
    page["items"].as_array_mut().unwrap().push(slow);
    let pods: &'static str = Box::leak(page.to_string().into_boxed_str());
    let metrics = "palisade_inbound_connections_total{client_id=\"spiffe://prod.example/ns/shop/sa/web\",port=\"8080\",decision=\"allow\"} 4\n";
    let (client, seen) = mock_api(move |path, _| match path {
        "/api/v1/pods" => (StatusCode::OK, pods),
        "/api/v1/namespaces/shop/pods/api-5c7d8f9b6-qw4rt:15021/proxy/metrics" => {
            (StatusCode::OK, metrics)
        }
        "/api/v1/namespaces/shop/pods/api-5c7d8f9b6-slow1:15021/proxy/metrics" => (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"error trying to reach service: dial tcp 10.244.1.7:15021: connect: connection refused","reason":"ServiceUnavailable","code":503}"#,
        ),
        _ => (StatusCode::NOT_FOUND, "{}"),
    });
    let found = proxy_metrics(&client, Some("shop")).await.unwrap();
    assert_eq!(
        found.answered,
        [("shop/api-5c7d8f9b6-qw4rt".to_owned(), metrics.to_owned())]
    );
    assert_eq!(found.missing.len(), 2, "{:?}", found.missing);
    assert!(
        found.missing[0].starts_with("shop/api-5c7d8f9b6-slow1: ")
            && found.missing[0].contains("connection refused"),
        "{:?}",
        found.missing
    );
    assert!(
        found.missing[1].starts_with("shop/intruder-6d8e0f1a2-mn3b7: ")
            && found.missing[1].contains("palisade.dev/admin-remote-metrics: \"true\""),
        "{:?}",
        found.missing
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].contains("fieldSelector=metadata.namespace%3Dshop"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|r| r.contains("intruder")),
        "a proxy that answers loopback only is not asked: {seen:?}"
    );
}
