//! The trust-anchor ConfigMap of one namespace: left alone when right, updated (on top of the
//! version read) when the bundle differs.

mod kube_support;

use http::{Method, StatusCode};
use kube_support::{Scenario, fixture_with, mock_client};
use palisade_ca::kube::anchors::{bundle_text, ensure};

const CM: &str = "/api/v1/namespaces/shop/configmaps/palisade-trust-anchors";
const OLD: &str = "-----BEGIN CERTIFICATE-----\\nOLD\\n-----END CERTIFICATE-----\\n";

fn bundle() -> String {
    bundle_text(&[
        "-----BEGIN CERTIFICATE-----\nROOT1\n-----END CERTIFICATE-----".to_owned(),
        "-----BEGIN CERTIFICATE-----\nROOT2\n-----END CERTIFICATE-----\n".to_owned(),
    ])
}

#[tokio::test]
async fn a_changed_bundle_updates_the_configmap() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let bundle = bundle();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    let (result, put) = tokio::join!(ensure(&client, "shop", &bundle), async {
        api.expect(
            Method::GET,
            CM,
            StatusCode::OK,
            fixture_with("configmap-trust-anchors.json", &[("BUNDLE", OLD)]),
        )
        .await;
        let (seen, send) = kube_support::receive(&mut api.handle).await;
        let body = seen.body.clone().unwrap();
        send.send_response(kube_support::json_response(StatusCode::OK, &body));
        seen
    });
    result.unwrap();
    assert_eq!((put.method, put.path.as_str()), (Method::PUT, CM));
    let body = put.body.unwrap();
    assert_eq!(body["data"]["ca.pem"], bundle.as_str());
    assert_eq!(
        body["metadata"]["resourceVersion"], "50412",
        "an update only on top of the version read"
    );
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "palisade-ca"
    );
}

#[tokio::test]
async fn an_up_to_date_configmap_is_left_alone() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let bundle = bundle();
    let escaped = serde_json::to_string(&bundle).unwrap();
    let escaped = &escaped[1..escaped.len() - 1];
    let (result, _) = tokio::join!(ensure(&client, "shop", &bundle), async {
        api.expect(
            Method::GET,
            CM,
            StatusCode::OK,
            fixture_with("configmap-trust-anchors.json", &[("BUNDLE", escaped)]),
        )
        .await;
        // Inside the join: a write would keep `ensure` waiting for its answer.
        api.expect_no_more().await;
    });
    result.unwrap();
}

/// A slow API server does not hold up shutdown: the distributor gives up a pending request.
#[tokio::test]
async fn shutdown_ends_a_distribution_waiting_on_the_api_server() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let (_opted_tx, opted_in) =
        tokio::sync::watch::channel(std::collections::BTreeSet::from(["shop".to_owned()]));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let distributor = tokio::spawn(palisade_ca::kube::anchors::distribute(
        client,
        bundle(),
        opted_in,
        stop_rx,
    ));
    // The GET arrives and is never answered.
    let (seen, _held) = kube_support::receive(&mut api.handle).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::GET, CM));
    stop.send_replace(true);
    tokio::time::timeout(kube_support::GUARD, distributor)
        .await
        .expect("the distributor stops at shutdown")
        .unwrap();
}
