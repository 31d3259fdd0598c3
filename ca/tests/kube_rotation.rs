//! Rotation in Kubernetes mode: the state in Secret `palisade-ca-keys` (written after each
//! move with the resourceVersion read; a 409 re-reads and reloads), a follower that never
//! writes and reloads what the driver wrote, every replica's proxy reports. The rotation Lease
//! is in `kube_rotation_lease.rs`. The API server is the scripted mock of `kube_support`,
//! answering recorded JSON.

mod kube_support;

use std::sync::Arc;

use base64::Engine;
use http::{Method, StatusCode};
use kube_support::{Scenario, fixture, fixture_with, json_response, mock_client, receive};
use palisade_ca::audit::AuditLog;
use palisade_ca::keys::{MemoryStore, load_or_create_generated};
use palisade_ca::kube::rotation_store::{Peers, SecretSync, Written, drive_once};
use palisade_ca::mesh::{MeshPublisher, MeshState};
use palisade_ca::metrics::Metrics;
use palisade_ca::rotation::{Kind, Rotation, Settings, SharedStore, Trigger};
use serde_json::Value;

const NS: &str = "palisade-system";
const TD: &str = "cluster.local";
const SECRET: &str = "/api/v1/namespaces/palisade-system/secrets/palisade-ca-keys";

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(0))
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn decoded(secret: &Value, key: &str) -> Option<String> {
    let text = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    Some(String::from_utf8(bytes).unwrap())
}

/// A root and intermediate as another replica made them.
fn made_store() -> MemoryStore {
    let mut store = MemoryStore::new();
    load_or_create_generated(&mut store, TD, &Default::default(), now()).unwrap();
    store
}

/// The Secret the API server holds for `store`, at resourceVersion `rv`.
fn secret_from(store: &MemoryStore, rv: &str) -> Value {
    let mut secret = fixture_with(
        "secret.json",
        &[
            ("ROOT", &b64(&store["root.pem"])),
            ("ROOT_KEY", &b64(&store["root-key.pem"])),
            ("INTERMEDIATE", &b64(&store["intermediate.pem"])),
            ("INTERMEDIATE_KEY", &b64(&store["intermediate-key.pem"])),
        ],
    );
    secret["metadata"]["resourceVersion"] = rv.into();
    for (name, text) in store {
        secret["data"][name] = b64(text).into();
    }
    secret
}

/// What another replica's rotation leaves in the store after `begin(kind)`.
fn begun_elsewhere(base: &MemoryStore, kind: Kind) -> MemoryStore {
    let store = SharedStore::new(base.clone());
    let rotation = Rotation::open(
        Box::new(store.clone()),
        TD,
        Settings::default(),
        Vec::new(),
        metrics(),
        now(),
    )
    .unwrap();
    rotation.begin(kind, Trigger::Manual, now()).unwrap();
    store.snapshot()
}

fn peers(client: &kube::Client) -> Peers {
    Peers {
        configmaps: kube::Api::namespaced(client.clone(), NS),
        pods: kube::Api::namespaced(client.clone(), NS),
        pod: "palisade-ca-6f7b9c-a1b2".into(),
    }
}

fn publisher() -> MeshPublisher {
    MeshPublisher::new(MeshState::new(
        TD.into(),
        Default::default(),
        Default::default(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    ))
}

/// Opens over the Secret `secret` (nothing to write back).
async fn opened(
    api: &mut Scenario,
    client: &kube::Client,
    secret: Value,
) -> (Rotation, SecretSync) {
    opened_with(api, client, secret, Settings::default()).await
}

async fn opened_with(
    api: &mut Scenario,
    client: &kube::Client,
    secret: Value,
    settings: Settings,
) -> (Rotation, SecretSync) {
    let open = SecretSync::open(client, NS, TD, settings, Vec::new(), metrics(), now());
    let (opened, _) = tokio::join!(
        open,
        api.expect(Method::GET, SECRET, StatusCode::OK, secret)
    );
    opened.expect("the Secret's keys open")
}

/// Answers the next request, which must be a PUT of the Secret, as the API server does: the
/// body stored at resourceVersion `rv`.
async fn answer_put(api: &mut Scenario, rv: &str) -> Value {
    let (seen, send) = receive(&mut api.handle).await;
    assert_eq!(
        (&seen.method, seen.path.as_str()),
        (&Method::PUT, SECRET),
        "{seen:?}"
    );
    let sent = seen.body.clone().expect("a PUT has a body");
    let mut stored = sent.clone();
    stored["metadata"]["resourceVersion"] = rv.into();
    send.send_response(json_response(StatusCode::OK, &stored));
    sent
}

#[tokio::test]
async fn the_driver_writes_a_begin_to_the_secret_with_the_resource_version_it_read() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    let (rotation, mut sync) = opened(&mut api, &client, secret_from(&base, "48213")).await;
    assert!(!sync.dirty(), "opening an idle Secret changes nothing");

    rotation
        .begin(Kind::Intermediate, Trigger::Manual, now())
        .unwrap();
    assert!(sync.dirty());
    let (written, sent) = tokio::join!(sync.write(), answer_put(&mut api, "48214"));
    assert_eq!(written.unwrap(), Written::Stored);
    assert_eq!(sent["metadata"]["resourceVersion"], "48213");
    for key in [
        "next-root.pem",
        "next-root-key.pem",
        "next-intermediate.pem",
        "next-intermediate-key.pem",
    ] {
        assert!(
            decoded(&sent, key).is_some_and(|t| t.contains("-----BEGIN ")),
            "{key}"
        );
    }
    let record = decoded(&sent, "rotation.json").expect("the record is written");
    assert!(record.contains("\"issuing\""), "{record}");
    assert_eq!(decoded(&sent, "root.pem").unwrap(), base["root.pem"]);
    assert_eq!(sync.resource_version(), Some("48214"));
    assert!(!sync.dirty());
    // Nothing changed since: nothing is written.
    assert_eq!(sync.write().await.unwrap(), Written::Unchanged);
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_conflicting_write_rereads_the_secret_and_reloads_what_another_writer_stored() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    let (rotation, mut sync) = opened(&mut api, &client, secret_from(&base, "100")).await;
    rotation
        .begin(Kind::Intermediate, Trigger::Manual, now())
        .unwrap();
    assert_eq!(rotation.status().phase, "issuing");

    let audit = AuditLog::stdout();
    let publisher = publisher();
    let peers = peers(&client);
    let drive = drive_once(
        &rotation, &mut sync, &peers, true, &publisher, &audit, false,
    );
    let (result, ()) = tokio::join!(drive, async {
        let put = api
            .expect(
                Method::PUT,
                SECRET,
                StatusCode::CONFLICT,
                fixture("secret-update-conflict-409.json"),
            )
            .await;
        assert_eq!(put.body.unwrap()["metadata"]["resourceVersion"], "100");
        // The other writer abandoned nothing: the Secret is idle at a newer version.
        api.expect(
            Method::GET,
            SECRET,
            StatusCode::OK,
            secret_from(&base, "107"),
        )
        .await;
    });
    assert!(result.unwrap(), "the Secret was read again");
    assert_eq!(rotation.status().phase, "idle", "the Secret is the truth");
    assert_eq!(sync.resource_version(), Some("107"));
    assert!(!sync.dirty());
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_follower_never_writes_and_reloads_when_the_secret_changes() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    // Were it to step, nothing would hold it back: no proxies to wait for, no settling time.
    let eager = Settings {
        settle: time::Duration::ZERO,
        reconnect_grace: time::Duration::ZERO,
        ..Settings::default()
    };
    let (rotation, mut sync) = opened_with(&mut api, &client, secret_from(&base, "5"), eager).await;
    let mut view = rotation.subscribe();
    assert_eq!(view.borrow_and_update().bundle_pem.len(), 1);
    let audit = AuditLog::stdout();
    let publisher = publisher();
    let peers = peers(&client);

    // Nothing to read this second: no request at all.
    let result = drive_once(
        &rotation, &mut sync, &peers, false, &publisher, &audit, false,
    )
    .await;
    assert!(!result.unwrap());
    api.expect_no_more().await;

    // The driver began a root rotation: the follower's proxies get both roots.
    let trusting = begun_elsewhere(&base, Kind::Root);
    let drive = drive_once(
        &rotation, &mut sync, &peers, false, &publisher, &audit, true,
    );
    let (result, _) = tokio::join!(
        drive,
        api.expect(
            Method::GET,
            SECRET,
            StatusCode::OK,
            secret_from(&trusting, "6")
        )
    );
    assert!(result.unwrap());
    assert!(
        view.has_changed().unwrap(),
        "the watches hear of the new bundle"
    );
    assert_eq!(view.borrow_and_update().bundle_pem.len(), 2);
    assert_eq!(rotation.status().phase, "trusting");
    assert_eq!(sync.resource_version(), Some("6"));

    // Even a rotation the follower holds is never stepped or written by it.
    let drive = drive_once(
        &rotation, &mut sync, &peers, false, &publisher, &audit, true,
    );
    let (result, _) = tokio::join!(
        drive,
        api.expect(
            Method::GET,
            SECRET,
            StatusCode::OK,
            secret_from(&trusting, "6")
        )
    );
    assert!(result.unwrap());
    assert!(!view.has_changed().unwrap());
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_malformed_rotation_entry_is_refused_naming_the_key() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let mut secret = secret_from(&made_store(), "9");
    secret["data"]["next-root.pem"] = b64("not a certificate").into();
    let open = SecretSync::open(
        &client,
        NS,
        TD,
        Settings::default(),
        Vec::new(),
        metrics(),
        now(),
    );
    let (opened, _) = tokio::join!(
        open,
        api.expect(Method::GET, SECRET, StatusCode::OK, secret)
    );
    let error = opened
        .expect_err("a broken next root is refused")
        .to_string();
    assert!(error.contains("key next-root.pem: not PEM"), "{error}");
    assert!(
        error.contains("Restore the Secret from a backup"),
        "{error}"
    );
}

const CONFIGMAPS: &str = "/api/v1/namespaces/palisade-system/configmaps";

fn eager() -> Settings {
    Settings {
        settle: time::Duration::ZERO,
        reconnect_grace: time::Duration::ZERO,
        ..Settings::default()
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The reports ConfigMaps: another replica's, written `age` ago, in which one proxy (heard only
/// there) trusts `roots`; and one of a replica gone for 11 minutes.
fn reports(age: time::Duration, roots: &[String]) -> Value {
    let proxy = serde_json::json!([{
        "pod_ip": null,
        "pod": "shop/web-7c9d-k2x1",
        "spiffe_id": "spiffe://cluster.local/ns/shop/sa/web",
        "owner": {"namespace": "shop", "service_account": "web"},
        "roots": roots,
        "leaf_issuer": null,
        "leaf_not_before": (now() - time::Duration::minutes(5)).unix_timestamp(),
        "leaf_not_after": (now() + time::Duration::minutes(55)).unix_timestamp(),
    }]);
    let mut list = fixture_with(
        "configmap-list-ca-proxies.json",
        &[
            ("WRITTEN", &rfc3339(now() - age)),
            (
                "GONE_WRITTEN",
                &rfc3339(now() - time::Duration::minutes(11)),
            ),
        ],
    );
    list["items"][0]["data"]["proxies.json"] = proxy.to_string().into();
    list
}

const GONE: &str =
    "/api/v1/namespaces/palisade-system/configmaps/palisade-ca-proxies-palisade-ca-6f7b9c-gone";

/// The pod of the reporting replica in [`reports`].
const REPLICA_POD: &str = "/api/v1/namespaces/palisade-system/pods/palisade-ca-6f7b9c-x2kq";

/// One driver step whose report list is `list`, writing a move as version `rv`.
async fn driver_step(
    api: &mut Scenario,
    rotation: &Rotation,
    sync: &mut SecretSync,
    peers: &Peers,
    list: Value,
    rv: &str,
) {
    driver_step_with(api, rotation, sync, peers, list, None, Some(rv)).await;
}

/// One driver step: the report list, the answer about a quiet replica's pod (when its report
/// is stale), and the version a written move gets (`None`: the step must write nothing).
async fn driver_step_with(
    api: &mut Scenario,
    rotation: &Rotation,
    sync: &mut SecretSync,
    peers: &Peers,
    list: Value,
    replica_pod: Option<(StatusCode, Value)>,
    rv: Option<&str>,
) {
    let audit = AuditLog::stdout();
    let publisher = publisher();
    let drive = drive_once(rotation, sync, peers, true, &publisher, &audit, false);
    let steps = async {
        tokio::join!(drive, async {
            let seen = api
                .expect(Method::GET, CONFIGMAPS, StatusCode::OK, list)
                .await;
            assert_eq!(seen.query["labelSelector"], "palisade.dev/ca-proxies=true");
            if let Some((status, pod)) = replica_pod {
                api.expect(Method::GET, REPLICA_POD, status, pod).await;
            }
            api.expect(
                Method::DELETE,
                GONE,
                StatusCode::OK,
                fixture("configmap-deleted-status.json"),
            )
            .await;
            if let Some(rv) = rv {
                answer_put(api, rv).await;
            }
        })
    };
    let (result, ()) = tokio::time::timeout(kube_support::GUARD, steps)
        .await
        .expect("the driver's step did not finish: it sent a request nobody answers (a move written where none was expected?)");
    result.unwrap();
}

#[tokio::test]
async fn the_driver_waits_for_a_proxy_only_another_replica_heard() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    let (rotation, mut sync) =
        opened_with(&mut api, &client, secret_from(&base, "20"), eager()).await;
    let peers = peers(&client);
    rotation.begin(Kind::Root, Trigger::Manual, now()).unwrap();
    let (written, _) = tokio::join!(sync.write(), answer_put(&mut api, "21"));
    assert_eq!(written.unwrap(), Written::Stored);
    let bundle = rotation.status().trusted_roots;
    assert_eq!(bundle.len(), 2);

    // This replica heard no proxy; the other one heard a proxy that trusts the old root only.
    // The step writes the (empty) local reports, and does not move.
    let old_only = reports(time::Duration::seconds(5), &bundle[..1]);
    driver_step(&mut api, &rotation, &mut sync, &peers, old_only, "22").await;
    assert_eq!(rotation.status().phase, "trusting");
    assert_eq!(rotation.status().proxies.lagging.len(), 1);

    // The other replica reports the proxy's confirmation: the next step moves on.
    let confirmed = reports(time::Duration::seconds(5), &bundle);
    driver_step(&mut api, &rotation, &mut sync, &peers, confirmed, "23").await;
    assert_eq!(rotation.status().phase, "issuing");
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_report_not_written_for_a_minute_is_ignored() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    let (rotation, mut sync) =
        opened_with(&mut api, &client, secret_from(&base, "30"), eager()).await;
    let peers = peers(&client);
    rotation.begin(Kind::Root, Trigger::Manual, now()).unwrap();
    let (written, _) = tokio::join!(sync.write(), answer_put(&mut api, "31"));
    assert_eq!(written.unwrap(), Written::Stored);
    let bundle = rotation.status().trusted_roots;

    // Its replica stopped writing 61 s ago and its pod is gone: what it said no longer holds
    // the rotation back (its proxies reconnect elsewhere).
    let stale = reports(time::Duration::seconds(61), &bundle[..1]);
    let gone = (
        StatusCode::NOT_FOUND,
        fixture("pod-ca-replica-notfound-404.json"),
    );
    driver_step_with(
        &mut api,
        &rotation,
        &mut sync,
        &peers,
        stale,
        Some(gone),
        Some("32"),
    )
    .await;
    assert_eq!(rotation.status().phase, "issuing");
    api.expect_no_more().await;
}

/// A replica that stopped reporting while its pod still runs (cut off from the API server)
/// serves proxies nobody heard: `trusting` waits for it, and moves once its pod is gone.
#[tokio::test]
async fn a_silent_replica_whose_pod_runs_holds_trusting() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let base = made_store();
    let (rotation, mut sync) =
        opened_with(&mut api, &client, secret_from(&base, "40"), eager()).await;
    let peers = peers(&client);
    rotation.begin(Kind::Root, Trigger::Manual, now()).unwrap();
    let (written, _) = tokio::join!(sync.write(), answer_put(&mut api, "41"));
    assert_eq!(written.unwrap(), Written::Stored);
    let bundle = rotation.status().trusted_roots;

    let running = (StatusCode::OK, fixture("pod-ca-replica.json"));
    for _ in 0..2 {
        let stale = reports(time::Duration::seconds(120), &bundle[..1]);
        driver_step_with(
            &mut api,
            &rotation,
            &mut sync,
            &peers,
            stale,
            Some(running.clone()),
            None,
        )
        .await;
        assert_eq!(rotation.status().phase, "trusting");
    }
    let mut leaving = fixture("pod-ca-replica.json");
    leaving["metadata"]["deletionTimestamp"] = "2026-11-30T22:00:00Z".into();
    let stale = reports(time::Duration::seconds(120), &bundle[..1]);
    driver_step_with(
        &mut api,
        &rotation,
        &mut sync,
        &peers,
        stale,
        Some((StatusCode::OK, leaving)),
        Some("42"),
    )
    .await;
    assert_eq!(rotation.status().phase, "issuing");
    api.expect_no_more().await;
}

#[tokio::test]
async fn the_trust_anchors_hold_both_roots_while_trusting() {
    use palisade_ca::kube::anchors::{bundle_text, distribute_following};
    const ANCHORS: &str = "/api/v1/namespaces/shop/configmaps/palisade-trust-anchors";
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let rotation = Rotation::open(
        Box::new(SharedStore::new(made_store())),
        TD,
        Settings::default(),
        Vec::new(),
        metrics(),
        now(),
    )
    .unwrap();
    let anchors = |bundle: &str| {
        let mut cm = fixture_with("configmap-trust-anchors.json", &[("BUNDLE", "")]);
        cm["data"]["ca.pem"] = bundle.into();
        cm
    };
    let (_opted_tx, opted_in) =
        tokio::sync::watch::channel(std::collections::BTreeSet::from(["shop".to_owned()]));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let one_root = bundle_text(&rotation.subscribe().borrow().bundle_pem);
    let distributor = tokio::spawn(distribute_following(
        client,
        rotation.subscribe(),
        opted_in,
        stop_rx,
    ));
    // Right as it is: left alone.
    api.expect(Method::GET, ANCHORS, StatusCode::OK, anchors(&one_root))
        .await;

    rotation.begin(Kind::Root, Trigger::Manual, now()).unwrap();
    let two_roots = bundle_text(&rotation.subscribe().borrow().bundle_pem);
    api.expect(Method::GET, ANCHORS, StatusCode::OK, anchors(&one_root))
        .await;
    let (seen, send) = receive(&mut api.handle).await;
    assert_eq!((&seen.method, seen.path.as_str()), (&Method::PUT, ANCHORS));
    let body = seen.body.unwrap();
    send.send_response(json_response(StatusCode::OK, &body));
    let written = body["data"]["ca.pem"].as_str().unwrap();
    assert_eq!(written, two_roots);
    assert_eq!(written.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(written.contains(one_root.trim_end()));

    stop.send_replace(true);
    tokio::time::timeout(kube_support::GUARD, distributor)
        .await
        .expect("the distributor stops at shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_replica_that_does_not_drive_starts_no_rotation() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let (rotation, sync) = opened(&mut api, &client, secret_from(&made_store(), "40")).await;
    sync.store().refuse_writes(Some(
        "this CA replica (palisade-ca-a) does not drive the rotation: palisade-ca-b holds Lease palisade-ca-rotation".into(),
    ));
    let before = rotation.subscribe().borrow().clone();
    let error = rotation
        .begin(Kind::Root, Trigger::Manual, now())
        .expect_err("a follower refuses")
        .to_string();
    assert!(error.contains("palisade-ca-b holds Lease"), "{error}");
    assert_eq!(rotation.status().phase, "idle");
    assert_eq!(*rotation.subscribe().borrow(), before);
    assert!(!sync.dirty(), "nothing was written into the store");
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_replica_publishes_what_its_own_proxies_reported_and_rewrites_it_while_alive() {
    use palisade_ca::kube::rotation_reports::ReportWriter;
    const MINE: &str =
        "/api/v1/namespaces/palisade-system/configmaps/palisade-ca-proxies-palisade-ca-6f7b9c-a1b2";
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let (rotation, _sync) = opened(&mut api, &client, secret_from(&made_store(), "50")).await;
    let mut writer = ReportWriter::new(
        kube::Api::namespaced(client.clone(), NS),
        "palisade-ca-6f7b9c-a1b2",
    );
    let at = now();
    let publish = writer.publish(&rotation, at);
    let (published, seen) = tokio::join!(publish, async {
        let (seen, send) = receive(&mut api.handle).await;
        let body = seen.body.clone().unwrap();
        send.send_response(json_response(StatusCode::OK, &body));
        seen
    });
    assert!(published.unwrap());
    assert_eq!((&seen.method, seen.path.as_str()), (&Method::PATCH, MINE));
    assert_eq!(seen.query["fieldManager"], "palisade-ca");
    let body = seen.body.unwrap();
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["kind"], "ConfigMap");
    assert_eq!(
        body["metadata"]["labels"]["palisade.dev/ca-proxies"],
        "true"
    );
    assert_eq!(
        body["metadata"]["annotations"]["palisade.dev/written-at"],
        rfc3339(at).as_str()
    );
    assert_eq!(body["data"]["proxies.json"], "[]");

    // Unchanged and fresh: not written again; unchanged for 30 s: written again to stay fresh.
    assert!(
        !writer
            .publish(&rotation, at + time::Duration::seconds(10))
            .await
            .unwrap()
    );
    let later = at + time::Duration::seconds(30);
    let (published, _) = tokio::join!(writer.publish(&rotation, later), async {
        let (seen, send) = receive(&mut api.handle).await;
        send.send_response(json_response(StatusCode::OK, &seen.body.clone().unwrap()));
    });
    assert!(published.unwrap());
    api.expect_no_more().await;
}
