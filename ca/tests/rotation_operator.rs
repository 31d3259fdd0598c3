//! Rotating to an intermediate signed by an operator's offline root (`rotate intermediate
//! --from-cert --from-key --chain`) over a real state directory: the root rotation it starts
//! under a new root, the intermediate rotation under the same one, a root whose key the CA
//! does not hold (never rotated on schedule, a warning instead; restarts resume), and every
//! refused input changing nothing.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use palisade_ca::keys::DirStore;
use palisade_ca::mesh::MeshState;
use palisade_ca::metrics::Metrics;
use palisade_ca::rotation::{Kind, Rotation, Settings, Trigger};
use palisade_ca_api::cert::{parse_pem_certs, sha256_fingerprint};
use support::{
    operator_intermediate, operator_intermediate_with, operator_root, operator_root_with,
};
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

fn open(dir: &Path, now: OffsetDateTime) -> Rotation {
    Rotation::open(
        Box::new(DirStore(dir.to_path_buf())),
        "cluster.local",
        settings(),
        Vec::new(),
        Arc::new(Metrics::new(0)),
        now,
    )
    .unwrap()
}

fn step(rotation: &Rotation, now: OffsetDateTime) -> String {
    rotation.step(&MeshState::default(), now).unwrap();
    rotation.status().phase
}

fn file(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

fn fingerprint(path: &Path) -> String {
    sha256_fingerprint(&parse_pem_certs(&std::fs::read_to_string(path).unwrap()).unwrap()[0])
}

/// Every file of the state directory and what it holds.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap_or_default())
        })
        .collect()
}

/// A CA in `dir` that has rotated to an intermediate of a new offline root made in `files`;
/// the root's files.
fn rotated_to_offline_root(
    dir: &Path,
    files: &Path,
    now: OffsetDateTime,
) -> (Rotation, (PathBuf, PathBuf)) {
    let rotation = open(dir, now);
    let root = operator_root(files, "offline");
    let (cert, key, chain) = operator_intermediate(files, "first", &root);
    rotation
        .begin_with_intermediate(&cert, &key, &chain, now)
        .unwrap();
    while step(&rotation, now) != "idle" {}
    (rotation, root)
}

#[test]
fn an_intermediate_under_a_new_offline_root_rotates_the_root_and_leaves_no_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let old = rotation.status();
    assert!(old.root_key_held);
    let root = operator_root(files.path(), "offline");
    let (cert, key, chain) = operator_intermediate(files.path(), "first", &root);
    let (theirs, their_intermediate) = (fingerprint(&root.0), fingerprint(&cert));

    rotation
        .begin_with_intermediate(&cert, &key, &chain, now)
        .unwrap();
    let trusting = rotation.status();
    assert_eq!(
        (trusting.phase.as_str(), trusting.kind.as_deref()),
        ("trusting", Some("root"))
    );
    assert_eq!(
        trusting.trusted_roots,
        vec![old.issuing_root.clone(), theirs.clone()]
    );
    assert_eq!(trusting.issuing_intermediate, old.issuing_intermediate);
    assert_eq!(rotation.subscribe().borrow().bundle_pem.len(), 2);
    assert!(file(dir.path(), "next-root-key.pem").is_none());

    assert_eq!(step(&rotation, now), "issuing");
    let issuing = rotation.status();
    assert_eq!(issuing.issuing_root, theirs);
    assert_eq!(issuing.issuing_intermediate, their_intermediate);
    assert!(!issuing.root_key_held);
    let signing = rotation.authority().chain_tail_der().to_vec();
    assert_eq!(sha256_fingerprint(&signing[0]), their_intermediate);

    assert_eq!(step(&rotation, now), "retiring");
    assert_eq!(step(&rotation, now), "idle");
    assert!(
        file(dir.path(), "root-key.pem").is_none(),
        "the old root key is gone and none replaced it"
    );
    assert_eq!(
        file(dir.path(), "root.pem"),
        file(files.path(), "offline.pem")
    );
    assert_eq!(
        file(dir.path(), "intermediate-key.pem"),
        file(files.path(), "first-key.pem")
    );
    for leftover in [
        "rotation.json",
        "next-root.pem",
        "next-intermediate.pem",
        "next-intermediate-key.pem",
    ] {
        assert!(file(dir.path(), leftover).is_none(), "{leftover} is left");
    }
    let bundle = palisade_ca::rotation::cli::bundle_pem(dir.path()).unwrap();
    let bundle = parse_pem_certs(&bundle).unwrap();
    assert_eq!(bundle.len(), 1);
    assert_eq!(sha256_fingerprint(&bundle[0]), theirs);

    // A restart when idle serves the same keys, without the root's key.
    drop(rotation);
    let restarted = open(dir.path(), now).status();
    assert_eq!(restarted.trusted_roots, vec![theirs]);
    assert_eq!(restarted.issuing_intermediate, their_intermediate);
    assert!(!restarted.root_key_held);
    assert!(
        file(dir.path(), "root-key-offline").is_some_and(|t| t.contains("kept offline")),
        "the note that the key is offline, not lost"
    );
    assert!(file(dir.path(), "next-root-key-offline").is_none());
}

/// A root key that is merely missing is a lost key: the CA refuses to start, and never takes
/// it for an operator's offline root.
#[test]
fn a_lost_root_key_stops_the_ca_and_is_never_taken_for_an_offline_one() {
    let now = t0();
    // A generated CA whose root key is deleted.
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), now));
    std::fs::remove_file(dir.path().join("root-key.pem")).unwrap();
    let open_err = |dir: &Path| {
        Rotation::open(
            Box::new(DirStore(dir.to_path_buf())),
            "cluster.local",
            settings(),
            Vec::new(),
            Arc::new(Metrics::new(0)),
            now,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    assert!(
        open_err(dir.path()).contains("root-key.pem"),
        "{}",
        open_err(dir.path())
    );
    // An operator's root whose note is gone.
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    drop(rotated_to_offline_root(dir.path(), files.path(), now));
    std::fs::remove_file(dir.path().join("root-key-offline")).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("root-key.pem"), "{e}");
}

#[test]
fn an_intermediate_rotation_under_the_same_offline_root_and_none_made_by_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let (rotation, root) = rotated_to_offline_root(dir.path(), files.path(), now);
    let before = snapshot(dir.path());
    let err = rotation
        .begin(Kind::Intermediate, Trigger::Manual, now)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not hold its root's key")
            && err.contains("rotate intermediate --from-cert F --from-key F --chain F"),
        "{err}"
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused start changes nothing"
    );

    let (cert, key, chain) = operator_intermediate(files.path(), "second", &root);
    rotation
        .begin_with_intermediate(&cert, &key, &chain, now)
        .unwrap();
    let issuing = rotation.status();
    assert_eq!(
        (issuing.phase.as_str(), issuing.kind.as_deref()),
        ("issuing", Some("intermediate")),
        "the same root: no trusting"
    );
    assert_eq!(issuing.trusted_roots, vec![fingerprint(&root.0)]);
    assert_eq!(issuing.issuing_intermediate, fingerprint(&cert));
    assert_eq!(step(&rotation, now + Duration::minutes(62)), "retiring");
    assert_eq!(step(&rotation, now), "idle");
    assert_eq!(
        file(dir.path(), "intermediate-key.pem"),
        file(files.path(), "second-key.pem")
    );
    assert!(file(dir.path(), "root-key.pem").is_none());
}

/// Log lines written while `f` runs on this thread.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = lines.0.lock().unwrap().clone();
    String::from_utf8(text).unwrap()
}

#[test]
fn a_keyless_root_is_never_rotated_on_schedule_and_a_warning_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let root = operator_root(files.path(), "offline");
    // Half its life is 15 days from its start, a day ago.
    let (cert, key, chain) = operator_intermediate_with(files.path(), "short", &root, |p| {
        p.not_after = now + Duration::days(29);
    });
    rotation
        .begin_with_intermediate(&cert, &key, &chain, now)
        .unwrap();
    while step(&rotation, now) != "idle" {}
    let status = rotation.status();
    assert!(status.automatic && !status.root_key_held);

    let quiet = logged(|| assert_eq!(step(&rotation, now + Duration::days(13)), "idle"));
    assert!(!quiet.contains("WARN"), "{quiet}");
    let due = now + Duration::days(15);
    let warned = logged(|| {
        assert_eq!(step(&rotation, due), "idle");
        assert_eq!(step(&rotation, due + Duration::minutes(30)), "idle");
    });
    assert_eq!(
        warned.matches("passed half its life").count(),
        1,
        "{warned}"
    );
    assert!(
        warned.contains("WARN")
            && warned.contains("rotate intermediate --from-cert F --from-key F --chain F"),
        "{warned}"
    );
    let again = logged(|| assert_eq!(step(&rotation, due + Duration::minutes(61)), "idle"));
    assert_eq!(again.matches("passed half its life").count(), 1, "{again}");
    assert_eq!(rotation.status().issuing_intermediate, fingerprint(&cert));
    assert!(file(dir.path(), "rotation.json").is_none());
}

#[test]
fn a_ca_restarted_in_any_phase_with_a_keyless_next_set_resumes() {
    for stop_in in ["trusting", "issuing", "retiring"] {
        let dir = tempfile::tempdir().unwrap();
        let files = tempfile::tempdir().unwrap();
        let now = t0();
        let root = operator_root(files.path(), "offline");
        let (cert, key, chain) = operator_intermediate(files.path(), "first", &root);
        {
            let rotation = open(dir.path(), now);
            rotation
                .begin_with_intermediate(&cert, &key, &chain, now)
                .unwrap();
            while rotation.status().phase != stop_in {
                step(&rotation, now);
            }
        }
        let rotation = open(dir.path(), now);
        let expect = if stop_in == "retiring" {
            "idle"
        } else {
            stop_in
        };
        assert_eq!(rotation.status().phase, expect, "stopped in {stop_in}");
        for _ in 0..4 {
            step(&rotation, now);
        }
        let done = rotation.status();
        assert_eq!(done.phase, "idle", "stopped in {stop_in}");
        assert_eq!(done.trusted_roots, vec![fingerprint(&root.0)], "{stop_in}");
        assert_eq!(done.issuing_intermediate, fingerprint(&cert), "{stop_in}");
        assert!(file(dir.path(), "root-key.pem").is_none(), "{stop_in}");
    }
}

#[test]
fn each_refused_input_names_the_file_and_the_fix_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    let now = t0();
    let rotation = open(dir.path(), now);
    let before = snapshot(dir.path());
    let root = operator_root(f, "offline");
    let other_root = operator_root(f, "other");
    let (good, good_key, chain) = operator_intermediate(f, "good", &root);
    let (_, other_key, other_chain) = operator_intermediate(f, "stranger", &other_root);
    let two = f.join("two.pem");
    std::fs::write(
        &two,
        format!(
            "{}{}",
            std::fs::read_to_string(&other_root.0).unwrap(),
            std::fs::read_to_string(&root.0).unwrap()
        ),
    )
    .unwrap();
    let (expired, expired_key, _) = operator_intermediate_with(f, "expired", &root, |p| {
        p.not_before = now - Duration::days(30);
        p.not_after = now - Duration::days(1);
    });
    let (short, short_key, _) = operator_intermediate_with(f, "short", &root, |p| {
        p.not_after = now + Duration::days(3);
    });
    let (leafy, leafy_key, _) = operator_intermediate_with(f, "leafy", &root, |p| {
        p.is_ca = rcgen::IsCa::NoCa;
    });
    let brief_root = operator_root_with(f, "brief", |p| {
        p.not_after = now + Duration::days(60);
    });
    let (outliving, outliving_key, brief_chain) =
        operator_intermediate(f, "outliving", &brief_root);
    let in_use =
        ["intermediate.pem", "intermediate-key.pem", "root.pem"].map(|n| dir.path().join(n));

    let cases: Vec<(&str, [&Path; 3], Vec<&str>)> = vec![
        (
            "wrong key",
            [&good, &other_key, &chain],
            vec![
                "good.pem",
                "stranger-key.pem",
                "does not belong to the certificate",
            ],
        ),
        (
            "another root",
            [&good, &good_key, &other_chain],
            vec![
                "good.pem",
                "was not issued by the root in",
                "stranger-chain.pem",
            ],
        ),
        (
            "a chain of two",
            [&good, &good_key, &two],
            vec!["two.pem", "holds 2 certificates", "takes exactly one"],
        ),
        (
            "the intermediate in its own chain",
            [&good, &good_key, &good],
            vec!["starts with the intermediate itself"],
        ),
        (
            "a chain that is no root",
            [&good, &good_key, &expired],
            vec!["expired.pem"],
        ),
        (
            "expired",
            [&expired, &expired_key, &chain],
            vec!["expired.pem", "expired at", "at least 7 days left"],
        ),
        (
            "short-lived",
            [&short, &short_key, &chain],
            vec!["short.pem", "expires in 3 days", "at least 7 days left"],
        ),
        (
            "not a CA",
            [&leafy, &leafy_key, &chain],
            vec!["leafy.pem", "is not a CA certificate"],
        ),
        (
            "outlives its root",
            [&outliving, &outliving_key, &brief_chain],
            vec!["outliving.pem", "after its root", "no later than the root"],
        ),
        (
            "the intermediate in use",
            [&in_use[0], &in_use[1], &in_use[2]],
            vec!["intermediate.pem", "nothing to rotate"],
        ),
        (
            "a directory",
            [&good, &good_key, f],
            vec!["not a regular file"],
        ),
    ];
    for (what, [cert, key, chain], expect) in cases {
        let err = rotation
            .begin_with_intermediate(cert, key, chain, now)
            .unwrap_err()
            .to_string();
        for part in expect {
            assert!(err.contains(part), "{what}: {part:?} missing from: {err}");
        }
        assert_eq!(rotation.status().phase, "idle", "{what}");
        assert_eq!(snapshot(dir.path()), before, "{what} changed the state dir");
    }
    // The good one is taken.
    rotation
        .begin_with_intermediate(&good, &good_key, &chain, now)
        .unwrap();
    assert_eq!(rotation.status().phase, "trusting");
}

#[test]
fn an_operators_intermediate_under_a_root_whose_key_the_ca_holds_keeps_that_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let now = t0();
    let rotation = open(dir.path(), now);
    let root = operator_root(files.path(), "held");
    rotation.begin_with_root(&root.0, &root.1, now).unwrap();
    while step(&rotation, now) != "idle" {}
    let (cert, key, chain) = operator_intermediate(files.path(), "signed", &root);
    rotation
        .begin_with_intermediate(&cert, &key, &chain, now)
        .unwrap();
    let issuing = rotation.status();
    assert_eq!(
        (issuing.phase.as_str(), issuing.root_key_held),
        ("issuing", true)
    );
    assert_eq!(step(&rotation, now + Duration::minutes(62)), "retiring");
    assert_eq!(step(&rotation, now), "idle");
    assert_eq!(
        file(dir.path(), "root-key.pem"),
        file(files.path(), "held-key.pem"),
        "the root's key stays"
    );
    assert_eq!(rotation.status().issuing_intermediate, fingerprint(&cert));
}
