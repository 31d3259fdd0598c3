use super::*;
use std::os::unix::fs::PermissionsExt;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// A CA (or not) certificate and its key, self-signed or issued by `parent`.
fn make_cert(
    is_ca: bool,
    lifetime: Duration,
    parent: Option<(&CertificateDer<'static>, &KeyPair)>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = ca_params(
        ca_name("test", if is_ca { "ca" } else { "leaf" }),
        1,
        now(),
        lifetime,
    );
    if !is_ca {
        p.is_ca = IsCa::ExplicitNoCa;
    }
    if lifetime.is_negative() {
        p.not_before = now() - Duration::days(10);
        p.not_after = now() + lifetime;
    }
    let cert = match parent {
        None => p.self_signed(&key).unwrap(),
        Some((pc, pk)) => p
            .signed_by(&key, &Issuer::from_ca_cert_der(pc, pk).unwrap())
            .unwrap(),
    };
    (cert.der().clone(), key)
}

#[test]
fn first_start_creates_private_keys_0600_and_restart_keeps_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create(dir.path(), &KeySource::Generated, "cluster.local", now()).unwrap();
    for key in [ROOT_KEY_FILE, INTERMEDIATE_KEY_FILE] {
        assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
    }
    let second = load_or_create(dir.path(), &KeySource::Generated, "cluster.local", now()).unwrap();
    assert_eq!(first.roots, second.roots);
    assert_eq!(first.intermediates, second.intermediates);
    let (_, root) = X509Certificate::from_der(&first.roots[0]).unwrap();
    let years = (root.validity().not_after.to_datetime() - now()).whole_days() / 365;
    assert_eq!(
        years, 9,
        "root lives 10 years (minus the days of this year)"
    );
    assert!(root.is_ca());
    assert!(issued_by(&first.intermediates[0], &first.roots[0]));
    assert!(first.issuer().is_ok());
}

#[test]
fn loosened_key_permissions_are_tightened() {
    let dir = tempfile::tempdir().unwrap();
    load_or_create(dir.path(), &KeySource::Generated, "td", now()).unwrap();
    let key = dir.path().join(ROOT_KEY_FILE);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    load_or_create(dir.path(), &KeySource::Generated, "td", now()).unwrap();
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn a_root_without_its_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    load_or_create(dir.path(), &KeySource::Generated, "td", now()).unwrap();
    fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let err = load_or_create(dir.path(), &KeySource::Generated, "td", now()).unwrap_err();
    assert!(matches!(err, KeyError::Incomplete { .. }), "{err}");
    assert!(err.to_string().contains(ROOT_KEY_FILE));
}

#[test]
fn external_root_is_used_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (root, root_key) = make_cert(true, Duration::days(100), None);
    let cert = write(dir.path(), "ext-root.pem", &cert_to_pem(&root));
    let key = write(dir.path(), "ext-root-key.pem", &root_key.serialize_pem());
    let state = dir.path().join("state");
    let km = load_or_create(
        &state,
        &KeySource::ExternalRoot {
            cert: cert.clone(),
            key: key.clone(),
        },
        "td",
        now(),
    )
    .unwrap();
    assert_eq!(km.roots[0], root);
    assert!(issued_by(&km.intermediates[0], &root));

    // A key of another pair.
    let other = write(
        dir.path(),
        "other-key.pem",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let err = load_or_create(
        &state,
        &KeySource::ExternalRoot {
            cert: cert.clone(),
            key: other,
        },
        "td",
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, KeyError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("other-key.pem") && err.to_string().contains("ext-root.pem"));

    // Not a CA.
    let (leaf, leaf_key) = make_cert(false, Duration::days(10), None);
    let leaf_cert = write(dir.path(), "leaf.pem", &cert_to_pem(&leaf));
    let leaf_key = write(dir.path(), "leaf-key.pem", &leaf_key.serialize_pem());
    let err = load_or_create(
        &state,
        &KeySource::ExternalRoot {
            cert: leaf_cert,
            key: leaf_key,
        },
        "td",
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, KeyError::NotCa(ref p) if p.ends_with("leaf.pem")),
        "{err}"
    );

    // Expired.
    let (old, old_key) = make_cert(true, Duration::days(-1), None);
    let old_cert = write(dir.path(), "old.pem", &cert_to_pem(&old));
    let old_key = write(dir.path(), "old-key.pem", &old_key.serialize_pem());
    let err = load_or_create(
        &state,
        &KeySource::ExternalRoot {
            cert: old_cert,
            key: old_key,
        },
        "td",
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, KeyError::Expired(ref p, _) if p.ends_with("old.pem")),
        "{err}"
    );

    // Garbage.
    let junk = write(dir.path(), "junk.pem", "hello");
    let err = load_or_create(
        &state,
        &KeySource::ExternalRoot { cert: junk, key },
        "td",
        now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, KeyError::Parse(ref p, _) if p.ends_with("junk.pem")),
        "{err}"
    );
}

#[test]
fn external_intermediate_keeps_the_root_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (root, root_key) = make_cert(true, Duration::days(100), None);
    let (inter, inter_key) = make_cert(true, Duration::days(50), Some((&root, &root_key)));
    let cert = write(dir.path(), "inter.pem", &cert_to_pem(&inter));
    let key = write(dir.path(), "inter-key.pem", &inter_key.serialize_pem());
    let chain = write(dir.path(), "chain.pem", &cert_to_pem(&root));
    let source = KeySource::ExternalIntermediate {
        cert: cert.clone(),
        key: key.clone(),
        chain,
    };
    let km = load_or_create(&dir.path().join("s"), &source, "td", now()).unwrap();
    assert_eq!(km.roots, vec![root]);
    assert_eq!(km.intermediates, vec![inter]);
    assert!(!dir.path().join("s").join(ROOT_KEY_FILE).exists());

    // A chain whose root did not issue the intermediate.
    let (stranger, _) = make_cert(true, Duration::days(100), None);
    let bad_chain = write(dir.path(), "bad-chain.pem", &cert_to_pem(&stranger));
    let source = KeySource::ExternalIntermediate {
        cert,
        key,
        chain: bad_chain,
    };
    let err = load_or_create(&dir.path().join("s"), &source, "td", now()).unwrap_err();
    assert!(
        matches!(err, KeyError::Chain(ref p, _) if p.ends_with("bad-chain.pem")),
        "{err}"
    );
}
