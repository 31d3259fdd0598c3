//! The binary's command line: start-up errors name what is wrong; `init --dry-run` prints the
//! rules; bad `init` flags are refused with the flag named.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_palisade-proxy");

fn run_with(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("run").env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &[(&str, &str)] = &[
    ("PALISADE_CA_ADDR", "127.0.0.1:1"),
    ("PALISADE_TRUST_ANCHORS", "/nonexistent/ca.pem"),
    ("PALISADE_TOKEN_FILE", "/nonexistent/token"),
    ("PALISADE_NAMESPACE", "shop"),
    ("PALISADE_SERVICE_ACCOUNT", "web"),
    ("PALISADE_POD_IP", "127.0.0.1"),
];

#[test]
fn a_malformed_variable_stops_start_up_naming_it() {
    let mut env = GOOD.to_vec();
    env.push(("PALISADE_INBOUND_DETECT_TIMEOUT", "fast"));
    let (code, err) = run_with(&env);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("PALISADE_INBOUND_DETECT_TIMEOUT") && err.contains("fast"),
        "{err}"
    );

    let (code, err) = run_with(&GOOD[1..]);
    assert_eq!(code, 2);
    assert!(err.contains("PALISADE_CA_ADDR is not set"), "{err}");
}

#[test]
fn unreadable_trust_anchors_stop_start_up_naming_the_file() {
    let (code, err) = run_with(GOOD);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("PALISADE_TRUST_ANCHORS=/nonexistent/ca.pem"),
        "{err}"
    );
}

#[test]
fn init_dry_run_prints_the_rules_and_bad_flags_are_named() {
    let out = Command::new(BIN)
        .args(["init", "--dry-run", "--skip-outbound-ports", "5432"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-t nat -A PALISADE_OUTBOUND -p tcp --dport 5432 -j RETURN"),
        "{text}"
    );
    assert!(
        text.contains("-t nat -A PREROUTING -p tcp -j PALISADE_INBOUND"),
        "{text}"
    );

    // Both families: each with its own loopback and its own skipped ranges, and IPv6's
    // fallback when it cannot be captured.
    let out = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00:ec2::254",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let (v4, rest) = text.split_once("# IPv6 (when").expect("an IPv6 section");
    let (v6, closed) = rest
        .split_once("# IPv6 when it cannot")
        .expect("a fallback");
    for (section, has, lacks) in [
        (v4, "iptables", "ip6tables"),
        (v4, "-d 10.0.0.0/8 -j RETURN", "fd00:ec2::254"),
        (v4, "-d 127.0.0.0/8 -j RETURN", "::1/128"),
        (v6, "ip6tables", "-d 10.0.0.0/8"),
        (v6, "-d fd00:ec2::254/128 -j RETURN", "127.0.0.0/8"),
        (
            v6,
            "-t nat -A PREROUTING -p tcp -j PALISADE_INBOUND",
            "PALISADE_IPV6_CLOSED",
        ),
        (
            closed,
            "-A OUTPUT ! -o lo -p tcp -j PALISADE_IPV6_CLOSED",
            "-t nat",
        ),
    ] {
        assert!(section.contains(has), "{has} in:\n{section}");
        assert!(!section.contains(lacks), "{lacks} in:\n{section}");
    }

    let out = Command::new(BIN)
        .args(["init", "--dry-run", "--skip-outbound-cidrs", "10.0.0.0/40"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--skip-outbound-cidrs"), "{err}");
}
