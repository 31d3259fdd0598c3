//! The whole mesh, for real: two pods in network namespaces, each with `palisade-proxy init`
//! and `palisade-proxy run` as uid 1337, a `palisade-ca` on the file source, an unmodified
//! `curl` → `python3 -m http.server` exchange over mTLS (checked on a packet capture), a
//! plaintext caller denied, and no failed request across certificate rotations. The scenario
//! is `tests/e2e/two_pods.sh`.
//!
//! Needs root and a built `palisade-ca` (`PALISADE_CA_BIN`, else `target/debug/palisade-ca` or
//! `target/release/palisade-ca` of the workspace; this crate never builds it). Skipped, with
//! the reason printed, otherwise.

use std::path::PathBuf;
use std::process::Command;

fn ca_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PALISADE_CA_BIN") {
        return Some(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    ["target/debug/palisade-ca", "target/release/palisade-ca"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.exists())
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip", "iptables", "curl", "setpriv", "/usr/bin/python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    if ca_binary().is_none() {
        return Some(
            "no palisade-ca binary: build it (cargo build -p palisade-ca) or set PALISADE_CA_BIN"
                .into(),
        );
    }
    None
}

#[test]
fn two_pods_talk_mtls_deny_a_plaintext_caller_and_survive_rotation() {
    if let Some(reason) = skip_reason() {
        println!(
            "SKIPPED two_pods_talk_mtls_deny_a_plaintext_caller_and_survive_rotation: {reason}"
        );
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/two_pods.sh");
    let out = Command::new("timeout")
        .arg("240")
        .arg("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_palisade-proxy"))
        .arg(ca_binary().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "two_pods.sh failed:\n{stdout}\n{stderr}"
    );
}
