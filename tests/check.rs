//! `palisade check` end to end against a scripted API server (tower-test mock behind
//! `kube::Client`), answering with recorded, real-shaped objects: a healthy cluster is all
//! green with exit 0; each fault is a red line naming it, with its fix, and exit 1; a cluster
//! that cannot be listed is exit 2 with the cause.

mod kube_check_support;

use std::process::ExitCode;

use http::Method;
use kube_check_support::*;
use palisade::check::Output;
use serde_json::json;

/// Runs the check on `cluster`; asserts exit 1 and that exactly `red` checks are red.
async fn broken(cluster: &Cluster, red: &[&str]) -> Run {
    let run = cluster.check(Output::Json).await;
    assert_eq!(run.red(), red, "{}", run.stdout);
    assert_eq!(run.code, ExitCode::from(1));
    run
}

#[tokio::test]
async fn a_healthy_cluster_is_all_green() {
    let run = Cluster::healthy().check(Output::Text).await;
    assert_eq!(run.code, ExitCode::SUCCESS, "{}", run.stdout);
    assert!(!run.stdout.contains('✘'), "{}", run.stdout);
    for line in [
        "✔ ca-pods: 1 CA pod(s) ready in palisade-system: palisade-ca-6b8f9c7d5-x7k2p",
        "✔ ca-api: CA pod palisade-system/palisade-ca-6b8f9c7d5-x7k2p answers GET /rotation and GET /metrics",
        "✔ webhook: MutatingWebhookConfiguration palisade-injector is installed",
        "✔ webhook-ca-bundle: the caBundle verifies the injector's serving certificate",
        "✔ crd: meshpolicies.palisade.dev serves v1alpha1",
        "✔ unmeshed-pods: every pod of the opted-in namespaces (shop) runs the proxy, or opted out",
        "✔ proxies-ready: 2 proxies ready",
        "✔ proxy-trust-bundle: every proxy trusts every root of the CA's bundle",
        "✔ policies: 1 MeshPolicies: each selects a meshed pod",
        "✔ namespace-default-policy: every palisade.dev/default-policy annotation is valid",
    ] {
        assert!(run.stdout.contains(line), "no {line:?} in\n{}", run.stdout);
    }
    assert!(
        run.stdout
            .contains("the mesh would keep working for 29 minutes")
    );
    // Read-only: gets and lists, nothing else.
    assert!(
        run.requests.iter().all(|(m, _)| m == Method::GET),
        "{:?}",
        run.requests
    );
    assert!(run.requests.iter().any(|(_, p)| p == ROTATION));
    assert!(run.requests.iter().any(|(_, p)| p == METRICS));
}

#[tokio::test]
async fn json_output_has_one_stable_shape() {
    let run = Cluster::healthy().check(Output::Json).await;
    assert_eq!(run.code, ExitCode::SUCCESS);
    let results = run.results();
    assert!(results.len() >= 14, "{results:#?}");
    for r in &results {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["check", "fix", "message", "ok"], "{r}");
        assert_eq!(r["fix"], serde_json::Value::Null);
    }
}

#[tokio::test]
async fn a_ca_pod_that_is_not_ready() {
    let mut cluster = Cluster::healthy();
    let pod = cluster.item(PODS, CA_POD);
    pod["status"]["conditions"][2]["status"] = json!("False");
    pod["status"]["containerStatuses"][0]["ready"] = json!(false);
    pod["status"]["containerStatuses"][0]["state"] = json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}});
    let run = broken(&cluster, &["ca-pods", "ca-api"]).await;
    let (message, fix) = run.red_line("ca-pods", CA_POD);
    assert_eq!(
        message,
        "CA pod palisade-system/palisade-ca-6b8f9c7d5-x7k2p is not ready: container ca waiting: CrashLoopBackOff"
    );
    assert!(fix.starts_with("kubectl -n palisade-system describe pod palisade-ca-6b8f9c7d5-x7k2p"));
}

#[tokio::test]
async fn a_ca_whose_admin_port_does_not_answer() {
    let mut cluster = Cluster::healthy();
    let refused = Answer::Text(
        503,
        "error trying to reach service: dial tcp 10.244.1.3:15014: connect: connection refused"
            .into(),
    );
    cluster.answer(ROTATION, refused.clone());
    cluster.answer(METRICS, refused);
    let run = broken(&cluster, &["ca-api"]).await;
    let (_, fix) = run.red_line(
        "ca-api",
        "GET /rotation from the CA's admin port failed: HTTP 503",
    );
    assert!(fix.contains("NetworkPolicy palisade-ca"), "{fix}");
    run.red_line(
        "ca-api",
        "GET /metrics from the CA's admin port failed: HTTP 503",
    );
}

#[tokio::test]
async fn a_root_near_expiry_without_a_rotation() {
    let mut cluster = Cluster::healthy();
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(12);
    cluster.json(ROTATION)["root_expires_at"] = json!(
        soon.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    let run = broken(&cluster, &["ca-root-expiry"]).await;
    let (message, fix) = run.red_line("ca-root-expiry", "under 30) and no rotation is running");
    assert!(
        message.contains("in 11 days") || message.contains("in 12 days"),
        "{message}"
    );
    assert!(
        fix.contains("replace the root by hand"),
        "the recorded CA is not rotatable: {fix}"
    );
    // The same root during a rotation is fine.
    cluster.json(ROTATION)["phase"] = json!("trusting");
    assert_eq!(cluster.check(Output::Json).await.code, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_proxy_that_lags_the_bundle() {
    let mut cluster = Cluster::healthy();
    cluster.json(ROTATION)["proxies"] = json!({"total": 2, "confirmed": 1, "lagging": [
        {"pod": "shop/api-5c7d8f9b6-qw4rt", "spiffe_id": "spiffe://cluster.local/ns/shop/sa/api"}]});
    let run = broken(&cluster, &["proxy-trust-bundle"]).await;
    let (_, fix) = run.red_line("proxy-trust-bundle", "proxy of shop/api-5c7d8f9b6-qw4rt");
    assert!(fix.starts_with("kubectl -n shop logs api-5c7d8f9b6-qw4rt -c palisade-proxy"));
}

#[tokio::test]
async fn no_webhook_configuration() {
    let mut cluster = Cluster::healthy();
    cluster.answer(WEBHOOK, not_found(WEBHOOK));
    let run = broken(&cluster, &["webhook"]).await;
    run.red_line("webhook", "palisade-injector is missing");
}

#[tokio::test]
async fn webhook_selectors_edited_away_from_the_charts() {
    let mut cluster = Cluster::healthy();
    cluster.json(WEBHOOK)["webhooks"][0]["objectSelector"] = json!({});
    let run = broken(&cluster, &["webhook-selectors"]).await;
    run.red_line(
        "webhook-selectors",
        "objectSelector does not leave out pods labelled palisade.dev/inject=disabled",
    );
}

#[tokio::test]
async fn failing_closed_over_kube_system() {
    let mut cluster = Cluster::healthy();
    cluster.json(WEBHOOK)["webhooks"][0]["namespaceSelector"]["matchExpressions"][1]["values"] =
        json!(["palisade-system"]);
    let run = broken(&cluster, &["webhook-failure-scope"]).await;
    let (_, fix) = run.red_line("webhook-failure-scope", "does not exclude kube-system");
    assert!(
        fix.starts_with("add kubernetes.io/metadata.name NotIn [kube-system, palisade-system]")
    );
}

#[tokio::test]
async fn a_webhook_that_fails_open() {
    let mut cluster = Cluster::healthy();
    cluster.json(WEBHOOK)["webhooks"][0]["failurePolicy"] = json!("Ignore");
    let run = broken(&cluster, &["webhook-failure-scope"]).await;
    let (_, fix) = run.red_line("webhook-failure-scope", "failurePolicy Ignore");
    assert!(fix.starts_with("set failurePolicy: Fail, as the chart does"));
}

#[tokio::test]
async fn a_namespace_selector_narrowed_by_hand() {
    let mut cluster = Cluster::healthy();
    cluster.json(WEBHOOK)["webhooks"][0]["namespaceSelector"]["matchExpressions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "team", "operator": "In", "values": ["payments"]}));
    let run = broken(&cluster, &["webhook-selectors"]).await;
    run.red_line(
        "webhook-selectors",
        "namespaceSelector selects more narrowly than the chart's",
    );
}

#[tokio::test]
async fn a_ca_bundle_that_does_not_verify_the_injector() {
    let mut cluster = Cluster::healthy();
    let other = palisade_testkit::pki::webhook_serving(&INJECTOR_NAMES, 3650);
    cluster.json(WEBHOOK)["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&other.ca_pem));
    let run = broken(&cluster, &["webhook-ca-bundle"]).await;
    let (_, fix) = run.red_line(
        "webhook-ca-bundle",
        "does not verify the injector's serving certificate",
    );
    assert!(fix.starts_with("kubectl -n palisade-system delete secret palisade-injector-tls"));
}

#[tokio::test]
async fn an_injector_certificate_near_expiry() {
    let run = broken(&Cluster::with_injector_days(2), &["injector-cert-expiry"]).await;
    run.red_line("injector-cert-expiry", "under 7 days");
}

#[tokio::test]
async fn no_crd() {
    let mut cluster = Cluster::healthy();
    cluster.answer(CRD, not_found(CRD));
    cluster.answer(POLICIES, not_found(POLICIES));
    let run = broken(&cluster, &["crd"]).await;
    let (_, fix) = run.red_line("crd", "meshpolicies.palisade.dev is not installed");
    assert!(
        fix.starts_with("kubectl apply -f charts/palisade/crds/meshpolicies.palisade.dev.yaml")
    );
}

#[tokio::test]
async fn a_crd_of_another_version() {
    let mut cluster = Cluster::healthy();
    cluster.json(CRD)["spec"]["versions"][0]["name"] = json!("v1alpha0");
    let run = broken(&cluster, &["crd"]).await;
    run.red_line(
        "crd",
        "serves [v1alpha0], and this version of Palisade needs v1alpha1",
    );
}

#[tokio::test]
async fn a_pod_without_the_proxy_in_an_opted_in_namespace() {
    let mut cluster = Cluster::healthy();
    let web = cluster.item(PODS, "web-7f6e5d4c3-b2n9v");
    web["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("palisade.dev/injected");
    web["spec"]
        .as_object_mut()
        .unwrap()
        .remove("initContainers");
    web["status"]
        .as_object_mut()
        .unwrap()
        .remove("initContainerStatuses");
    let run = broken(&cluster, &["unmeshed-pod"]).await;
    let (_, fix) = run.red_line(
        "unmeshed-pod",
        "shop/web-7f6e5d4c3-b2n9v runs without the proxy",
    );
    assert_eq!(fix, "kubectl -n shop rollout restart deployment/web");
}

#[tokio::test]
async fn a_proxy_that_is_not_ready() {
    let mut cluster = Cluster::healthy();
    let api = cluster.item(PODS, "api-5c7d8f9b6-qw4rt");
    api["status"]["initContainerStatuses"][0]["ready"] = json!(false);
    api["status"]["initContainerStatuses"][0]["restartCount"] = json!(3);
    api["status"]["initContainerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "CrashLoopBackOff"}});
    api["status"]["initContainerStatuses"][0]["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error",
        "startedAt": "2026-11-22T07:25:01Z", "finishedAt": "2026-11-22T07:25:02Z"}});
    let run = broken(&cluster, &["proxies-ready"]).await;
    let (message, fix) = run.red_line("proxies-ready", "shop/api-5c7d8f9b6-qw4rt");
    assert_eq!(
        message,
        "proxy of shop/api-5c7d8f9b6-qw4rt is not ready: waiting: CrashLoopBackOff; last terminated: Error (exit code 1); 3 restarts"
    );
    assert!(
        fix.starts_with("kubectl -n shop logs api-5c7d8f9b6-qw4rt -c palisade-proxy --previous")
    );
}

fn add_policy(cluster: &mut Cluster, name: &str, spec: serde_json::Value) {
    let mut policy = cluster.json(POLICIES)["items"][0].clone();
    policy["metadata"]["name"] = json!(name);
    policy["spec"] = spec;
    cluster.json(POLICIES)["items"]
        .as_array_mut()
        .unwrap()
        .push(policy);
}

#[tokio::test]
async fn a_policy_that_selects_no_pod() {
    let mut cluster = Cluster::healthy();
    add_policy(
        &mut cluster,
        "cart-from-web",
        json!({"targetSelector": {"matchLabels": {"app": "cart"}}, "allow": [{"serviceAccounts": ["shop/web"]}]}),
    );
    let run = broken(&cluster, &["policy-selects-nothing"]).await;
    run.red_line(
        "policy-selects-nothing",
        "MeshPolicy shop/cart-from-web selects no meshed pod",
    );
}

#[tokio::test]
async fn a_policy_that_names_a_missing_service_account_or_namespace() {
    let mut cluster = Cluster::healthy();
    cluster.json(POLICIES)["items"][0]["spec"]["allow"] =
        json!([{"serviceAccounts": ["shop/wbe"]}, {"namespaces": ["monitorng"]}]);
    let run = broken(&cluster, &["policy-unknown-reference"]).await;
    run.red_line(
        "policy-unknown-reference",
        "allows service account shop/wbe, namespace monitorng that does not exist",
    );
}

#[tokio::test]
async fn a_policy_shadowed_by_another() {
    let mut cluster = Cluster::healthy();
    add_policy(
        &mut cluster,
        "api-all-shop",
        json!({"targetSelector": {"matchLabels": {"app": "api"}},
        "allow": [{"namespaces": ["shop", "monitoring"]}]}),
    );
    let run = broken(&cluster, &["policy-shadowed"]).await;
    run.red_line(
        "policy-shadowed",
        "MeshPolicy shop/api-from-web is shadowed by api-all-shop",
    );
}

#[tokio::test]
async fn a_malformed_policy_is_one_red_line() {
    let mut cluster = Cluster::healthy();
    add_policy(&mut cluster, "garbled", json!({"allow": [{"alow": true}]}));
    let run = broken(&cluster, &["policy-malformed"]).await;
    run.red_line(
        "policy-malformed",
        "MeshPolicy shop/garbled is ignored by the CA",
    );
}

#[tokio::test]
async fn an_invalid_default_policy_annotation() {
    let mut cluster = Cluster::healthy();
    cluster.item(NAMESPACES, "shop")["metadata"]["annotations"]["palisade.dev/default-policy"] =
        json!("allow-all");
    let run = broken(&cluster, &["namespace-default-policy"]).await;
    let (_, fix) = run.red_line("namespace-default-policy", "namespace shop: annotation palisade.dev/default-policy: \"allow-all\" is not a default policy");
    assert!(fix.contains("deny, all-authenticated or all"));
}

#[tokio::test]
async fn a_cluster_that_cannot_be_listed_is_exit_2_with_the_cause() {
    let mut cluster = Cluster::healthy();
    cluster.answer(NAMESPACES, forbidden("namespaces"));
    let run = cluster.check(Output::Text).await;
    assert_eq!(run.code, ExitCode::from(2));
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .starts_with("palisade check: not allowed to list namespaces (HTTP 403"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("docs/rbac.md"));
    cluster.answer(NAMESPACES, Answer::Down);
    let run = cluster.check(Output::Text).await;
    assert_eq!(run.code, ExitCode::from(2));
    assert!(
        run.stderr
            .starts_with("palisade check: cannot list namespaces from the API server"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("kubectl config current-context"));
}

#[tokio::test]
async fn a_malformed_pod_is_one_red_line_not_a_failed_run() {
    let mut cluster = Cluster::healthy();
    cluster.item(PODS, "web-7f6e5d4c3-b2n9v")["spec"]["containers"] = json!("web");
    let run = broken(&cluster, &["malformed-object"]).await;
    let (message, _) = run.red_line(
        "malformed-object",
        "pods shop/web-7f6e5d4c3-b2n9v could not be read",
    );
    assert!(
        message.contains("invalid type: string \"web\", expected a sequence"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_ca_admin_port_that_hangs_is_red_after_the_timeout() {
    let mut cluster = Cluster::healthy();
    cluster.answer(ROTATION, Answer::Silent);
    let run = broken(&cluster, &["ca-api"]).await;
    run.red_line(
        "ca-api",
        "GET /rotation from the CA's admin port got no answer within 10 s",
    );
    // The metrics still answer, and stand in for the rotation status.
    assert!(
        run.results()
            .iter()
            .any(|r| r["check"] == "ca-root-expiry" && r["ok"] == true)
    );
}
