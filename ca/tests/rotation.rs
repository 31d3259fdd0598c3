//! The rotation's state machine over a real state directory: each phase's bundle and signer,
//! the conditions that move it (proxies' reports, deadlines, the schedule), a restart in every
//! phase, the old keys destroyed at the end, and the emergency path.

mod support;

use std::path::Path;
use std::sync::Arc;

use palisade_ca::keys::{DirStore, KeyError, Lifetimes};
use palisade_ca::mesh::MeshState;
use palisade_ca::mesh::watch::Owner;
use palisade_ca::metrics::Metrics;
use palisade_ca::rotation::{Kind, Rotation, RotationError, Settings, Trigger, WatchReport};
use palisade_ca_api::cert::{parse_pem_certs, sha256_fingerprint};
use support::{operator_root, operator_root_with};
use time::{Duration, OffsetDateTime};

fn t0() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn settings() -> Settings {
    Settings {
        settle: Duration::ZERO,
        reconnect_grace: Duration::ZERO,
        max_leaf_lifetime: Duration::hours(1),
        ..Default::default()
    }
}

fn open_with(
    dir: &Path,
    settings: Settings,
    now: OffsetDateTime,
) -> Result<Rotation, RotationError> {
    Rotation::open(
        Box::new(DirStore(dir.to_path_buf())),
        "cluster.local",
        settings,
        Vec::new(),
        Arc::new(Metrics::new(0)),
        now,
    )
}

fn open(dir: &Path, now: OffsetDateTime) -> Rotation {
    open_with(dir, settings(), now).unwrap()
}

/// A proxy's watch: the roots it trusts, and the intermediate its leaf came from.
fn report(rotation: &Rotation, name: &str, roots: &[String], issuer: &str) {
    rotation.registry.report(WatchReport {
        pod_ip: None,
        pod: Some(format!("shop/{name}")),
        spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/{name}"),
        owner: Owner {
            namespace: "shop".into(),
            service_account: name.into(),
        },
        roots: roots.to_vec(),
        leaf_issuer: Some(issuer.into()),
        leaf_not_before: t0().unix_timestamp(),
        leaf_not_after: (t0() + Duration::days(1)).unix_timestamp(),
    });
}

fn step(rotation: &Rotation, now: OffsetDateTime) -> String {
    rotation.step(&MeshState::default(), now).unwrap();
    rotation.status().phase
}

fn file(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

#[test]
fn a_root_rotation_waits_for_every_proxy_then_drains_the_old_leaves_and_destroys_the_old_keys() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let before = rotation.status();
    let (old_root, old_intermediate) = (before.issuing_root.clone(), before.issuing_intermediate);
    let old_keys = (
        file(dir.path(), "root-key.pem"),
        file(dir.path(), "intermediate-key.pem"),
    );
    report(
        &rotation,
        "web",
        std::slice::from_ref(&old_root),
        &old_intermediate,
    );
    report(
        &rotation,
        "api",
        std::slice::from_ref(&old_root),
        &old_intermediate,
    );

    rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
    let trusting = rotation.status();
    assert_eq!(trusting.phase, "trusting");
    assert_eq!(trusting.trusted_roots.len(), 2);
    assert_eq!(
        trusting.issuing_root, old_root,
        "the old intermediate still signs"
    );
    let new_root = trusting.trusted_roots[1].clone();
    assert_ne!(new_root, old_root);
    assert_eq!(rotation.subscribe().borrow().bundle_pem.len(), 2);
    assert!(rotation.subscribe().borrow().renew.is_none());
    // A second start is refused while this one runs.
    let err = rotation
        .begin(Kind::Intermediate, Trigger::Manual, now)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already under way (phase trusting)"),
        "{err}"
    );

    // Nobody has confirmed: it stays, and says who lags, even past the deadline.
    assert_eq!(step(&rotation, now), "trusting");
    let both = vec![old_root.clone(), new_root.clone()];
    report(&rotation, "web", &both, &old_intermediate);
    assert_eq!(step(&rotation, now + Duration::hours(2)), "trusting");
    let lagging = rotation.status().proxies.lagging;
    assert_eq!(lagging.len(), 1);
    assert_eq!(lagging[0].pod.as_deref(), Some("shop/api"));
    report(&rotation, "api", &both, &old_intermediate);
    assert_eq!(step(&rotation, now), "issuing");

    let issuing = rotation.status();
    assert_eq!(issuing.issuing_root, new_root);
    let new_intermediate = issuing.issuing_intermediate.clone();
    let renew = rotation
        .subscribe()
        .borrow()
        .renew
        .clone()
        .expect("proxies are told to renew");
    assert_eq!(renew.unless_issued_by, new_intermediate);
    assert_eq!(renew.within_seconds, 300);
    assert_eq!(issuing.leaves_on_previous_root, 2);
    // The authority signs with the new intermediate now.
    let leaf_chain = rotation.authority().chain_tail_der().to_vec();
    assert_eq!(sha256_fingerprint(&leaf_chain[0]), new_intermediate);

    // One proxy still holds a leaf of the old intermediate: it waits.
    report(&rotation, "web", &both, &new_intermediate);
    assert_eq!(step(&rotation, now), "issuing");
    report(&rotation, "api", &both, &new_intermediate);
    assert_eq!(step(&rotation, now), "retiring");
    assert_eq!(rotation.status().trusted_roots, vec![new_root.clone()]);
    assert_eq!(rotation.subscribe().borrow().bundle_pem.len(), 1);

    assert_eq!(step(&rotation, now), "idle");
    let root = parse_pem_certs(&file(dir.path(), "root.pem").unwrap()).unwrap();
    assert_eq!(sha256_fingerprint(&root[0]), new_root);
    assert_ne!(
        file(dir.path(), "root-key.pem"),
        old_keys.0,
        "the old root key is gone"
    );
    assert_ne!(file(dir.path(), "intermediate-key.pem"), old_keys.1);
    for leftover in [
        "rotation.json",
        "next-root.pem",
        "next-root-key.pem",
        "next-intermediate-key.pem",
    ] {
        assert!(file(dir.path(), leftover).is_none(), "{leftover} is left");
    }
    assert!(rotation.subscribe().borrow().renew.is_none());
}

#[test]
fn issuing_ends_when_no_old_leaf_can_still_be_valid_even_if_a_proxy_never_reports() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let old = rotation.status().issuing_intermediate;
    report(&rotation, "silent", &[rotation.status().issuing_root], &old);
    rotation
        .begin(Kind::Intermediate, Trigger::Manual, now)
        .unwrap();
    let status = rotation.status();
    assert_eq!(
        status.phase, "issuing",
        "an intermediate rotation skips trusting"
    );
    assert_eq!(status.trusted_roots.len(), 1);
    assert_eq!(step(&rotation, now + Duration::minutes(30)), "issuing");
    // The longest leaf (1 h) plus the back-dating has passed.
    assert_eq!(step(&rotation, now + Duration::minutes(62)), "retiring");
}

#[test]
fn a_ca_restarted_in_any_phase_resumes_and_completes_the_rotation() {
    for stop_in in ["trusting", "issuing", "retiring"] {
        let dir = tempfile::tempdir().unwrap();
        let now = t0();
        let new_root = {
            let rotation = open(dir.path(), now);
            rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
            let new_root = rotation.status().trusted_roots[1].clone();
            while rotation.status().phase != stop_in {
                step(&rotation, now);
            }
            new_root
        };
        let rotation = open(dir.path(), now);
        let resumed = rotation.status();
        let expect = if stop_in == "retiring" {
            "idle"
        } else {
            stop_in
        };
        assert_eq!(resumed.phase, expect, "stopped in {stop_in}");
        for _ in 0..4 {
            step(&rotation, now);
        }
        let done = rotation.status();
        assert_eq!(done.phase, "idle", "stopped in {stop_in}");
        assert_eq!(
            done.trusted_roots,
            vec![new_root.clone()],
            "stopped in {stop_in}"
        );
        assert!(file(dir.path(), "rotation.json").is_none());
    }
}

#[test]
fn a_start_that_did_not_complete_is_abandoned_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let root = open(dir.path(), now).status().issuing_root;
    // Keys of a next set were written, the record was not.
    std::fs::copy(
        dir.path().join("root.pem"),
        dir.path().join("next-root.pem"),
    )
    .unwrap();
    let rotation = open(dir.path(), now);
    assert_eq!(rotation.status().phase, "idle");
    assert_eq!(rotation.status().issuing_root, root);
    assert!(file(dir.path(), "next-root.pem").is_none());
}

#[test]
fn the_schedule_starts_the_intermediate_at_half_its_life_and_the_root_at_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let lifetimes = Lifetimes {
        root: Duration::days(100),
        intermediate: Duration::days(10),
    };
    let s = Settings {
        lifetimes,
        ..settings()
    };
    let rotation = open_with(dir.path(), s.clone(), now).unwrap();
    assert_eq!(step(&rotation, now + Duration::days(4)), "idle");
    assert_eq!(
        step(&rotation, now + Duration::days(5) + Duration::minutes(10)),
        "issuing"
    );

    let dir = tempfile::tempdir().unwrap();
    let rotation = open_with(dir.path(), s.clone(), now).unwrap();
    assert_eq!(step(&rotation, now + Duration::days(81)), "trusting");

    let dir = tempfile::tempdir().unwrap();
    let manual = Settings {
        automatic: false,
        ..s
    };
    let rotation = open_with(dir.path(), manual, now).unwrap();
    assert_eq!(step(&rotation, now + Duration::days(81)), "idle");
}

#[test]
fn leaves_never_outlive_the_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let s = Settings {
        lifetimes: Lifetimes {
            root: Duration::days(1),
            intermediate: Duration::minutes(20),
        },
        ..settings()
    };
    let rotation = open_with(dir.path(), s, now).unwrap();
    let authority = rotation.authority();
    let key = rcgen::KeyPair::generate().unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let leaf = authority
        .issue_leaf(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            &id,
            Duration::hours(24),
            now,
        )
        .unwrap();
    assert_eq!(leaf.not_after, authority.intermediate_not_after());
    assert!(authority.intermediate_not_after() <= authority.root_not_after());
}

#[test]
fn an_expired_root_stops_the_start_with_the_emergency_path_and_that_path_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    open(dir.path(), now);
    let later = now + Duration::days(3651);
    let err = open_with(dir.path(), settings(), later).unwrap_err();
    let RotationError::Keys(KeyError::RootExpired(..)) = &err else {
        panic!("{err}")
    };
    assert!(
        err.to_string()
            .contains("palisade-ca rotate root --emergency"),
        "{err}"
    );

    let pem = palisade_ca::rotation::cli::emergency_root(
        dir.path(),
        "cluster.local",
        &Lifetimes::default(),
    )
    .unwrap();
    let rotation = open(dir.path(), now);
    let new_root = sha256_fingerprint(&parse_pem_certs(&pem).unwrap()[0]);
    assert_eq!(rotation.status().trusted_roots, vec![new_root]);
    assert_eq!(
        palisade_ca::rotation::cli::bundle_pem(dir.path()).unwrap(),
        pem
    );
}

#[test]
fn the_bundle_command_follows_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let bundle = || {
        parse_pem_certs(&palisade_ca::rotation::cli::bundle_pem(dir.path()).unwrap())
            .unwrap()
            .len()
    };
    assert_eq!(bundle(), 1);
    rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
    assert_eq!(bundle(), 2);
    step(&rotation, now);
    assert_eq!(bundle(), 2, "issuing");
    step(&rotation, now);
    assert_eq!(rotation.status().phase, "retiring");
    assert_eq!(bundle(), 1);
}

#[test]
fn a_restarted_ca_still_waits_for_the_proxies_it_heard_and_for_the_others_to_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    {
        let rotation = open(dir.path(), now);
        let before = rotation.status();
        report(
            &rotation,
            "web",
            std::slice::from_ref(&before.issuing_root),
            &before.issuing_intermediate,
        );
        rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
        assert_eq!(step(&rotation, now), "trusting");
    }
    // Nobody has reconnected yet, but web was heard before the restart: still lagging.
    let rotation = open(dir.path(), now);
    assert_eq!(step(&rotation, now), "trusting");
    assert_eq!(rotation.status().proxies.lagging.len(), 1);
    // With the reconnect grace, an empty hearing decides nothing either.
    let dir = tempfile::tempdir().unwrap();
    open(dir.path(), now)
        .begin(Kind::Intermediate, Trigger::Manual, now)
        .unwrap();
    let graceful = Settings {
        reconnect_grace: Duration::seconds(30),
        ..settings()
    };
    let rotation = open_with(dir.path(), graceful, now).unwrap();
    assert_eq!(step(&rotation, now + Duration::seconds(29)), "issuing");
    assert_eq!(step(&rotation, now + Duration::seconds(30)), "retiring");
}

#[test]
fn a_root_rotation_can_be_abandoned_while_trusting_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let root = rotation.status().issuing_root;
    assert!(
        rotation
            .abort()
            .unwrap_err()
            .to_string()
            .contains("no rotation")
    );
    rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
    rotation.abort().unwrap();
    let status = rotation.status();
    assert_eq!(
        (status.phase.as_str(), status.trusted_roots.clone()),
        ("idle", vec![root])
    );
    assert!(
        file(dir.path(), "next-root.pem").is_none() && file(dir.path(), "rotation.json").is_none()
    );
    rotation.begin(Kind::Root, Trigger::Manual, now).unwrap();
    step(&rotation, now);
    let err = rotation.abort().unwrap_err().to_string();
    assert!(
        err.contains("issuing") && err.contains("only go forward"),
        "{err}"
    );
}

#[test]
fn next_keys_are_private_and_a_missing_one_says_how_to_abandon_the_rotation() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let now = t0();
    open(dir.path(), now)
        .begin(Kind::Root, Trigger::Manual, now)
        .unwrap();
    for key in ["next-root-key.pem", "next-intermediate-key.pem"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    std::fs::remove_file(dir.path().join("next-intermediate.pem")).unwrap();
    let err = open_with(dir.path(), settings(), now)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("next-intermediate.pem is missing") && err.contains("remove"),
        "{err}"
    );
    assert!(err.contains("abandon the rotation"), "{err}");
}

#[test]
fn the_emergency_path_refuses_while_a_ca_holds_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _held = palisade_ca::rotation::keyset::lock_state_dir(dir.path()).unwrap();
    let err = palisade_ca::rotation::cli::emergency_root(
        dir.path(),
        "cluster.local",
        &Lifetimes::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("stop it first"), "{err}");
}

#[test]
fn a_root_rotation_to_an_operators_root_checks_it_and_signs_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let (cert, key) = operator_root(files.path(), "next");
    let (_, other_key) = operator_root(files.path(), "other");
    let err = rotation
        .begin_with_root(&cert, &other_key, now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not belong to the certificate"), "{err}");
    let current = dir.path().join("root.pem");
    let current_key = dir.path().join("root-key.pem");
    let err = rotation
        .begin_with_root(&current, &current_key, now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already uses"), "{err}");
    let intermediate = dir.path().join("intermediate.pem");
    let err = rotation
        .begin_with_root(&intermediate, &dir.path().join("intermediate-key.pem"), now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be self-signed"), "{err}");
    assert_eq!(
        rotation.status().phase,
        "idle",
        "a refused start changes nothing"
    );

    rotation.begin_with_root(&cert, &key, now).unwrap();
    let theirs =
        sha256_fingerprint(&parse_pem_certs(&std::fs::read_to_string(&cert).unwrap()).unwrap()[0]);
    let status = rotation.status();
    assert_eq!(status.phase, "trusting");
    assert_eq!(status.trusted_roots[1], theirs);
    assert_eq!(step(&rotation, now), "issuing");
    assert_eq!(
        rotation.status().issuing_root,
        theirs,
        "the new intermediate is under their root"
    );
}

#[test]
fn an_operators_root_near_expiry_or_not_a_file_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let (c, k) = operator_root_with(files.path(), "short", |p| {
        p.not_before = now - Duration::days(1);
        p.not_after = now + Duration::days(10);
    });
    let err = rotation
        .begin_with_root(&c, &k, now)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expires in 10 days") && err.contains("at least 30"),
        "{err}"
    );
    let err = rotation
        .begin_with_root(files.path(), &k, now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
    assert_eq!(rotation.status().phase, "idle");
}

#[test]
fn an_operators_root_whose_leaves_the_proxies_would_refuse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    // Only DNS names under example.com: the CA's own name is outside it.
    let (c, k) = operator_root_with(files.path(), "nc", |p| {
        p.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.com".into())],
            excluded_subtrees: vec![],
        });
    });
    let err = rotation
        .begin_with_root(&c, &k, now)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not verify as the proxies verify it"),
        "{err}"
    );
    assert_eq!(rotation.status().phase, "idle");
}
