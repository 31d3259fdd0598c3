//! Key material in Secret `palisade-ca-keys`: created when absent, the winner re-read after a
//! 409, a malformed Secret refused with a message naming it and the key.

mod kube_support;

use base64::Engine;
use http::{Method, StatusCode};
use kube_support::{Scenario, fixture, fixture_with, mock_client};
use palisade_ca::keys::{MemoryStore, load_or_create_generated};
use palisade_ca::kube::secret_keys::{SECRET_KEYS, load_or_create_in_secret};
use palisade_ca_api::cert::cert_to_pem;

const SECRET: &str = "/api/v1/namespaces/palisade-system/secrets/palisade-ca-keys";
const SECRETS: &str = "/api/v1/namespaces/palisade-system/secrets";

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The Secret another replica would have written: a real root and intermediate.
fn existing_secret() -> (serde_json::Value, String) {
    existing_secret_made_at(now())
}

fn existing_secret_made_at(made: time::OffsetDateTime) -> (serde_json::Value, String) {
    let mut store = MemoryStore::new();
    let material =
        load_or_create_generated(&mut store, "cluster.local", &Default::default(), made).unwrap();
    let b64 = |name: &str| base64::engine::general_purpose::STANDARD.encode(&store[name]);
    let secret = fixture_with(
        "secret.json",
        &[
            ("ROOT", &b64("root.pem")),
            ("ROOT_KEY", &b64("root-key.pem")),
            ("INTERMEDIATE", &b64("intermediate.pem")),
            ("INTERMEDIATE_KEY", &b64("intermediate-key.pem")),
        ],
    );
    (secret, cert_to_pem(&material.roots[0]))
}

fn decoded(data: &serde_json::Value, key: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD
        .decode(data[key].as_str().unwrap())
        .unwrap();
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn absent_secret_is_created_with_the_new_root() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let load = load_or_create_in_secret(&client, "palisade-system", "cluster.local", now());
    let (material, created) = tokio::join!(load, async {
        api.expect(
            Method::GET,
            SECRET,
            StatusCode::NOT_FOUND,
            fixture("secret-notfound-404.json"),
        )
        .await;
        let seen = api.handle.next_request();
        let (request, send) = tokio::time::timeout(kube_support::GUARD, seen)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::POST, SECRETS)
        );
        let body: serde_json::Value =
            serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
        send.send_response(kube_support::json_response(StatusCode::CREATED, &body));
        body
    });
    let material = material.expect("a new root is made and stored");
    assert_eq!(created["metadata"]["name"], "palisade-ca-keys");
    assert_eq!(created["metadata"]["namespace"], "palisade-system");
    assert_eq!(created["type"], "Opaque");
    assert_eq!(
        created["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "palisade-ca"
    );
    let keys: Vec<&str> = created["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = SECRET_KEYS.to_vec();
    expected.sort();
    assert_eq!(keys, expected);
    assert_eq!(
        decoded(&created["data"], "root.pem"),
        cert_to_pem(&material.roots[0])
    );
    assert!(decoded(&created["data"], "root-key.pem").contains("PRIVATE KEY"));
}

#[tokio::test]
async fn existing_secret_is_used_and_never_rewritten() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let (secret, root) = existing_secret();
    let load = load_or_create_in_secret(&client, "palisade-system", "cluster.local", now());
    let (material, _) = tokio::join!(load, async {
        api.expect(Method::GET, SECRET, StatusCode::OK, secret)
            .await;
        // Inside the join: a write would keep the load waiting for its answer.
        api.expect_no_more().await;
    });
    assert_eq!(cert_to_pem(&material.unwrap().roots[0]), root);
}

#[tokio::test]
async fn create_conflict_re_reads_the_winner() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    let (winner, winner_root) = existing_secret();
    let load = load_or_create_in_secret(&client, "palisade-system", "cluster.local", now());
    let (material, _) = tokio::join!(load, async {
        api.expect(
            Method::GET,
            SECRET,
            StatusCode::NOT_FOUND,
            fixture("secret-notfound-404.json"),
        )
        .await;
        api.expect(
            Method::POST,
            SECRETS,
            StatusCode::CONFLICT,
            fixture("secret-conflict-409.json"),
        )
        .await;
        api.expect(Method::GET, SECRET, StatusCode::OK, winner)
            .await;
    });
    let material = material.expect("the loser uses the winner's root");
    assert_eq!(
        cert_to_pem(&material.roots[0]),
        winner_root,
        "one root for both replicas"
    );
    api.expect_no_more().await;
}

#[tokio::test]
async fn malformed_secret_stops_start_up_naming_the_secret_and_key() {
    for (broken_key, replacement, says) in [
        ("root-key.pem", None, "missing"),
        ("intermediate.pem", Some("bm90IGEgY2VydA=="), "not PEM"),
        (
            "root.pem",
            Some(
                "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCmdhcmJhZ2UKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=",
            ),
            "root.pem",
        ),
    ] {
        let (client, handle) = mock_client("palisade-system");
        let mut api = Scenario { handle };
        let (mut secret, _) = existing_secret();
        match replacement {
            None => {
                secret["data"].as_object_mut().unwrap().remove(broken_key);
            }
            Some(v) => secret["data"][broken_key] = v.into(),
        }
        let load = load_or_create_in_secret(&client, "palisade-system", "cluster.local", now());
        let (result, _) = tokio::join!(load, async {
            api.expect(Method::GET, SECRET, StatusCode::OK, secret)
                .await
        });
        let message = result
            .expect_err("a malformed Secret is refused")
            .to_string();
        assert!(
            message.contains("palisade-system/palisade-ca-keys"),
            "{message}"
        );
        assert!(message.contains(broken_key), "{message}");
        assert!(message.contains(says), "{message}");
        api.expect_no_more().await;
    }
}

#[tokio::test]
async fn an_intermediate_near_expiry_is_renewed_on_top_of_the_version_read() {
    let (client, handle) = mock_client("palisade-system");
    let mut api = Scenario { handle };
    // Made 340 days ago: the one-year intermediate has less than 30 days left.
    let (secret, root) = existing_secret_made_at(now() - time::Duration::days(340));
    let old_intermediate = decoded(&secret["data"], "intermediate.pem");
    let load = load_or_create_in_secret(&client, "palisade-system", "cluster.local", now());
    let (material, put) = tokio::join!(load, async {
        api.expect(Method::GET, SECRET, StatusCode::OK, secret)
            .await;
        let (seen, send) = kube_support::receive(&mut api.handle).await;
        let body = seen.body.clone().unwrap();
        send.send_response(kube_support::json_response(StatusCode::OK, &body));
        seen
    });
    let material = material.unwrap();
    assert_eq!((put.method, put.path.as_str()), (Method::PUT, SECRET));
    let body = put.body.unwrap();
    assert_eq!(body["metadata"]["resourceVersion"], "48213");
    assert_eq!(
        decoded(&body["data"], "root.pem"),
        root,
        "the root is never replaced"
    );
    assert_ne!(decoded(&body["data"], "intermediate.pem"), old_intermediate);
    assert_eq!(cert_to_pem(&material.roots[0]), root);
    assert_eq!(
        decoded(&body["data"], "intermediate.pem"),
        cert_to_pem(&material.intermediates[0])
    );
}
