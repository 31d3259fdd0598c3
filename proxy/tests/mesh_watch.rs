//! The mesh watch: a snapshot then updates, destinations asked as they are met, the last
//! state kept through an outage, and fail-closed lookups when nothing is known.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::policy::DefaultPolicy;
use palisade_proxy::mesh::{MeshConfig, MeshView, run_watch};
use support::fake_mesh::FakeMesh;
use support::rig::{API, policy};
use tokio::sync::watch;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn state() -> Arc<MeshView> {
    Arc::new(MeshView::new(MeshConfig {
        pod_ip: Some(ip("10.77.0.2")),
        ..MeshConfig::default()
    }))
}

fn meshed(addr: &str, id: &str) -> palisade_ca_api::wire::Destination {
    palisade_ca_api::wire::Destination::meshed(
        ip(addr),
        id.parse().unwrap(),
        Some("shop/api".into()),
    )
}

#[tokio::test(start_paused = true)]
async fn snapshot_then_updates_and_destinations_asked_as_met() {
    let fake = FakeMesh::new();
    fake.set_inbound(policy(DefaultPolicy::AllAuthenticated, vec![]));
    fake.set_destination(meshed("10.77.0.3", API));
    let st = state();
    let (stop, stopped) = watch::channel(false);
    let source = fake.source();
    let task = tokio::spawn(run_watch(st.clone(), source, stopped));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(st.has_snapshot());
    assert_eq!(
        st.inbound().unwrap().default_policy,
        DefaultPolicy::AllAuthenticated
    );
    assert!(fake.last_query().unwrap().destinations.is_empty());

    let d = st
        .lookup(ip("10.77.0.3"), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(d.meshed);
    assert_eq!(d.spiffe_id.as_ref().unwrap().to_string(), API);
    assert_eq!(
        fake.last_query().unwrap().destinations,
        vec![ip("10.77.0.3")]
    );
    // Unknown to the control plane's state but answered: not meshed.
    let d = st
        .lookup(ip("10.77.0.9"), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(!d.meshed);
    assert_eq!(
        fake.last_query().unwrap().destinations,
        vec![ip("10.77.0.3"), ip("10.77.0.9")]
    );

    fake.set_inbound(policy(DefaultPolicy::Deny, vec![]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(st.inbound().unwrap().default_policy, DefaultPolicy::Deny);
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_control_plane_down_at_start_up_leaves_the_proxy_unready_and_failing_closed() {
    let fake = FakeMesh::new();
    fake.set_up(false);
    let st = state();
    let (stop, stopped) = watch::channel(false);
    let source = fake.source();
    let task = tokio::spawn(run_watch(st.clone(), source, stopped));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!st.has_snapshot());
    assert!(st.inbound().is_none());
    assert!(
        st.lookup(ip("10.77.0.3"), Duration::from_millis(300))
            .await
            .is_none()
    );
    assert!(fake.watches() > 2, "it keeps retrying");
    fake.set_up(true);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(st.has_snapshot());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_control_plane_that_goes_away_later_leaves_the_last_state_serving() {
    let fake = FakeMesh::new();
    fake.set_inbound(policy(DefaultPolicy::AllAuthenticated, vec![]));
    fake.set_destination(meshed("10.77.0.3", API));
    let st = state();
    let (stop, stopped) = watch::channel(false);
    let source = fake.source();
    let task = tokio::spawn(run_watch(st.clone(), source, stopped));
    assert!(
        st.lookup(ip("10.77.0.3"), Duration::from_secs(1))
            .await
            .is_some()
    );
    fake.set_up(false);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(st.inbound().is_some());
    let known = st
        .lookup(ip("10.77.0.3"), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(known.meshed);
    // A destination never answered fails closed.
    assert!(
        st.lookup(ip("10.77.0.8"), Duration::from_millis(300))
            .await
            .is_none()
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_destination_set_stays_bounded() {
    let fake = FakeMesh::new();
    let st = Arc::new(MeshView::new(MeshConfig {
        pod_ip: Some(ip("10.77.0.2")),
        max_destinations: 4,
        ..MeshConfig::default()
    }));
    let (stop, stopped) = watch::channel(false);
    let source = fake.source();
    let task = tokio::spawn(run_watch(st.clone(), source, stopped));
    for i in 0..20u8 {
        let a = IpAddr::from([10, 77, 1, i]);
        assert!(st.lookup(a, Duration::from_secs(1)).await.is_some());
    }
    assert!(fake.last_query().unwrap().destinations.len() <= 4);
    assert!(st.query().destinations.len() <= 4);
    stop.send(true).unwrap();
    task.await.unwrap();
}
