use serde_json::{Value, json};

use super::*;

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

/// A running pod of namespace `shop` with `metadata` merged over a plain one.
fn running(metadata: Value, spec: Value) -> Pod {
    let mut meta = json!({"name": "web-7d9f8c6b5-x2k4p", "namespace": "shop", "uid": "u1"});
    meta.as_object_mut()
        .unwrap()
        .extend(metadata.as_object().unwrap().clone());
    let mut pod_spec = json!({"containers": [{"name": "web"}]});
    pod_spec
        .as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    pod(json!({"metadata": meta, "spec": pod_spec, "status": {"phase": "Running"}}))
}

fn owned_by(kind: &str, name: &str) -> Value {
    json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": name,
        "uid": "o1", "controller": true}]})
}

#[test]
fn a_plain_running_pod_is_missing_the_proxy() {
    assert_eq!(
        classify(&running(json!({}), json!({}))),
        Some(Unmeshed::Missing)
    );
    // A pod still starting counts too: it will run without the proxy.
    let mut pending = running(json!({}), json!({}));
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    assert_eq!(classify(&pending), Some(Unmeshed::Missing));
}

#[test]
fn opted_out_by_label_or_annotation_wins_over_host_network() {
    for meta in [
        json!({"labels": {"palisade.dev/inject": "disabled"}}),
        json!({"annotations": {"palisade.dev/inject": "disabled"}}),
    ] {
        let p = running(meta.clone(), json!({"hostNetwork": true}));
        assert_eq!(classify(&p), Some(Unmeshed::OptedOut), "{meta}");
    }
    let p = running(
        json!({"labels": {"palisade.dev/inject": "enabled"}}),
        json!({}),
    );
    assert_eq!(classify(&p), Some(Unmeshed::Missing));
}

#[test]
fn host_network_pods_are_counted_apart() {
    let p = running(json!({}), json!({"hostNetwork": true}));
    assert_eq!(classify(&p), Some(Unmeshed::HostNetwork));
}

#[test]
fn finished_deleting_or_proxied_pods_need_no_word() {
    for phase in ["Succeeded", "Failed"] {
        let mut p = running(json!({}), json!({}));
        p.status.as_mut().unwrap().phase = Some(phase.into());
        assert_eq!(classify(&p), None, "{phase}");
    }
    let deleting = running(
        json!({"deletionTimestamp": "2026-11-30T10:00:00Z"}),
        json!({}),
    );
    assert_eq!(classify(&deleting), None);
    let sidecar = running(
        json!({}),
        json!({"initContainers": [{"name": "palisade-proxy", "restartPolicy": "Always"}]}),
    );
    assert_eq!(classify(&sidecar), None);
    let container = running(
        json!({}),
        json!({"containers": [{"name": "web"}, {"name": "palisade-proxy"}]}),
    );
    assert_eq!(classify(&container), None);
    let labelled = running(
        json!({"labels": {"palisade.dev/injected": "true"}}),
        json!({}),
    );
    assert_eq!(classify(&labelled), None);
}

#[test]
fn odd_pods_do_not_panic() {
    assert_eq!(
        classify(&pod(json!({"metadata": {}}))),
        Some(Unmeshed::Missing)
    );
    let fix = fix_for(&pod(json!({"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "-", "uid": "o"}]}})));
    assert!(fix.contains("delete pod"), "{fix}");
}

#[test]
fn a_deployment_pod_names_its_deployment() {
    let mut meta = owned_by("ReplicaSet", "web-7d9f8c6b5");
    meta["labels"] = json!({"pod-template-hash": "7d9f8c6b5"});
    let fix = fix_for(&running(meta, json!({})));
    assert_eq!(
        fix,
        "Restart its owner: kubectl -n shop rollout restart deployment/web"
    );
    // Hyphens inside the Deployment's name stay.
    let mut meta = owned_by("ReplicaSet", "shop-front-5f6d");
    meta["labels"] = json!({"pod-template-hash": "5f6d"});
    let fix = fix_for(&running(meta, json!({})));
    assert!(
        fix.ends_with("rollout restart deployment/shop-front"),
        "{fix}"
    );
}

#[test]
fn a_replicaset_made_by_hand_is_not_taken_for_a_deployment() {
    let mut meta = owned_by("ReplicaSet", "legacy-set");
    meta["labels"] = json!({"pod-template-hash": "7d9f8c6b5"});
    let fix = fix_for(&running(meta, json!({})));
    assert_eq!(
        fix,
        "Delete the pod so ReplicaSet legacy-set recreates it: kubectl -n shop delete pod web-7d9f8c6b5-x2k4p"
    );
    let fix = fix_for(&running(owned_by("ReplicaSet", "legacy-set"), json!({})));
    assert!(
        fix.starts_with("Delete the pod so ReplicaSet legacy-set"),
        "{fix}"
    );
}

#[test]
fn statefulsets_and_daemonsets_are_restarted_by_name() {
    let fix = fix_for(&running(owned_by("StatefulSet", "db"), json!({})));
    assert_eq!(
        fix,
        "Restart its owner: kubectl -n shop rollout restart statefulset/db"
    );
    let fix = fix_for(&running(owned_by("DaemonSet", "agent"), json!({})));
    assert_eq!(
        fix,
        "Restart its owner: kubectl -n shop rollout restart daemonset/agent"
    );
}

#[test]
fn the_controller_owner_is_preferred() {
    let meta = json!({"ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "a"},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "b", "controller": true}]});
    assert!(fix_for(&running(meta, json!({}))).ends_with("statefulset/db"));
}

#[test]
fn a_pod_without_owner_is_deleted_and_created_again() {
    let fix = fix_for(&running(json!({}), json!({})));
    assert_eq!(
        fix,
        "It has no owner to recreate it: delete it (kubectl -n shop delete pod web-7d9f8c6b5-x2k4p) and create it again"
    );
}

#[test]
fn jobs_and_other_owners_get_a_delete() {
    let fix = fix_for(&running(owned_by("Job", "nightly"), json!({})));
    assert!(
        fix.starts_with("Job nightly creates its next pods with the proxy"),
        "{fix}"
    );
    let fix = fix_for(&running(owned_by("Rollout", "canary"), json!({})));
    assert!(
        fix.starts_with("Recreate it through its owner Rollout/canary"),
        "{fix}"
    );
}

#[test]
fn the_note_says_what_why_and_the_fix_within_the_events_limit() {
    let mut meta = owned_by("ReplicaSet", "web-7d9f8c6b5");
    meta["labels"] = json!({"pod-template-hash": "7d9f8c6b5"});
    let note = note_for(&running(meta, json!({})));
    assert_eq!(
        note,
        "pod runs without the Palisade proxy in namespace shop, which is opted in \
         (palisade.dev/inject=enabled): it was created before the opt-in or while the injector \
         was unavailable. Restart its owner: kubectl -n shop rollout restart deployment/web"
    );
    // The longest names Kubernetes allows still fit events.k8s.io's 1 kB note.
    let long = "a".repeat(253);
    let meta = json!({"name": long, "namespace": "n".repeat(63), "ownerReferences": [
        {"apiVersion": "v1", "kind": "SomeVeryLongCustomKindName", "name": long, "uid": "o"}]});
    assert!(note_for(&pod(json!({"metadata": meta}))).len() <= 1024);
}
