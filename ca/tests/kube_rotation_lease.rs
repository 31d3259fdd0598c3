//! The rotation Lease in Kubernetes mode: created when absent, left alone while another
//! replica renews it, taken over (with its resourceVersion) once expired, and a lost race
//! followed. The API server is the scripted mock of `kube_support`, answering recorded JSON.

mod kube_support;

use http::{Method, StatusCode};
use kube_support::{Scenario, fixture, fixture_with, json_response, mock_client, receive};
use palisade_ca::kube::rotation_lease::{Leadership, LeaseKeeper};
use serde_json::Value;

const NS: &str = "palisade-system";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/palisade-system/leases/palisade-ca-rotation";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/palisade-system/leases";

fn lease(holder: &str, renewed: k8s_openapi::jiff::Timestamp) -> Value {
    fixture_with(
        "lease.json",
        &[
            ("RV", "731"),
            ("HOLDER", holder),
            ("RENEWED", &renewed.to_string()),
        ],
    )
}

fn whole_second_now() -> k8s_openapi::jiff::Timestamp {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap()
}

#[tokio::test]
async fn a_lease_held_by_a_live_replica_is_left_alone() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let keeper = LeaseKeeper::new(client, NS, "palisade-ca-a".into());
    let now = whole_second_now();
    let (seen, _) = tokio::join!(
        tokio::time::timeout(kube_support::GUARD, keeper.tick(now)),
        async {
            api.expect(
                Method::GET,
                LEASE,
                StatusCode::OK,
                lease("palisade-ca-b", now),
            )
            .await;
            // Never written: taking a live Lease would make two drivers.
            api.expect_no_more().await;
        }
    );
    assert_eq!(
        seen.expect("a follower decides without writing"),
        Leadership::Follower(Some("palisade-ca-b".into()))
    );
}

#[tokio::test]
async fn an_absent_lease_is_created_held_by_this_pod() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let keeper = LeaseKeeper::new(client, NS, "palisade-ca-a".into());
    let now = whole_second_now();
    let (seen, created) = tokio::join!(keeper.tick(now), async {
        api.expect(
            Method::GET,
            LEASE,
            StatusCode::NOT_FOUND,
            fixture("lease-notfound-404.json"),
        )
        .await;
        let (seen, send) = receive(&mut api.handle).await;
        assert_eq!((&seen.method, seen.path.as_str()), (&Method::POST, LEASES));
        let body = seen.body.unwrap();
        send.send_response(json_response(StatusCode::CREATED, &body));
        body
    });
    assert_eq!(seen, Leadership::Leader);
    assert_eq!(created["spec"]["holderIdentity"], "palisade-ca-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["metadata"]["name"], "palisade-ca-rotation");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_its_resource_version_and_a_lost_race_follows() {
    let (client, handle) = mock_client(NS);
    let mut api = Scenario { handle };
    let keeper = LeaseKeeper::new(client, NS, "palisade-ca-a".into());
    let now = whole_second_now();
    let expired = lease(
        "palisade-ca-b",
        now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(16))
            .unwrap(),
    );
    let (seen, put) = tokio::join!(keeper.tick(now), async {
        api.expect(Method::GET, LEASE, StatusCode::OK, expired.clone())
            .await;
        let (seen, send) = receive(&mut api.handle).await;
        assert_eq!((&seen.method, seen.path.as_str()), (&Method::PUT, LEASE));
        let body = seen.body.unwrap();
        send.send_response(json_response(StatusCode::OK, &body));
        body
    });
    assert_eq!(seen, Leadership::Leader);
    assert_eq!(put["metadata"]["resourceVersion"], "731");
    assert_eq!(put["spec"]["holderIdentity"], "palisade-ca-a");
    assert_eq!(put["spec"]["leaseTransitions"], 4);

    // Another replica took it over first: its write wins, this one follows.
    let (seen, _) = tokio::join!(keeper.tick(now), async {
        api.expect(Method::GET, LEASE, StatusCode::OK, expired)
            .await;
        api.expect(
            Method::PUT,
            LEASE,
            StatusCode::CONFLICT,
            fixture("lease-conflict-409.json"),
        )
        .await;
    });
    assert_eq!(seen, Leadership::Follower(None));
}
