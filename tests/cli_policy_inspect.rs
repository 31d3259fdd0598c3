//! `palisade policy check` and `palisade inspect`, as a user runs them.

use std::process::Command;

use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::pki::self_signed_leaf;

const BIN: &str = env!("CARGO_BIN_EXE_palisade");

fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn policy_check_with_a_mesh_file() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MeshFile::web_and_api().to_yaml()).unwrap();
    let m = mesh.to_str().unwrap();
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "shop/web",
        "--to",
        "shop/api",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ALLOW") && out.contains("shop/api-from-web (rule_matched)"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "spiffe://cluster.local/ns/shop/sa/evil",
        "--to",
        "shop/api",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY") && out.contains("no_rule_matched"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "plaintext",
        "--to",
        "shop/web",
        "--port",
        "80",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("default:all-authenticated (plaintext_not_allowed)"),
        "{out}"
    );
    let (code, out) = check(&[
        "--mesh-file",
        m,
        "--from",
        "shop/web",
        "--to",
        "shop/nope",
        "--port",
        "80",
    ]);
    assert_eq!(code, 2);
    assert!(out.contains("no workload shop/nope"), "{out}");
}

#[test]
fn policy_check_with_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policies.yaml");
    std::fs::write(
        &p,
        "apiVersion: palisade.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: trial, namespace: shop}\nspec: {mode: audit, allow: [{namespaces: [monitoring]}]}\n",
    )
    .unwrap();
    let p = p.to_str().unwrap();
    let (code, out) = check(&[
        "--policies",
        p,
        "--from",
        "shop/web",
        "--to",
        "shop",
        "--labels",
        "app=api",
        "--port",
        "9090",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("audit: would be denied") && out.contains("shop/trial"),
        "{out}"
    );
    let (code, out) = check(&[
        "--policies",
        p,
        "--from",
        "shop/web",
        "--to",
        "shop",
        "--port",
        "9090",
        "--default-policy",
        "open",
    ]);
    assert_eq!(code, 2);
    assert!(out.contains("deny, all-authenticated or all"), "{out}");
}

#[test]
fn inspect_explains_a_leaf_and_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = self_signed_leaf("spiffe://cluster.local/ns/shop/sa/web").cert_pem;
    let path = dir.path().join("leaf.pem");
    std::fs::write(&path, &leaf).unwrap();
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("identity    spiffe://cluster.local/ns/shop/sa/web"),
        "{text}"
    );
    assert!(text.contains("a Palisade mesh leaf"), "{text}");
    std::fs::write(&path, "garbage").unwrap();
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usable certificate"));
}
