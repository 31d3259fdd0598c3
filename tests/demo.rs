//! `palisade demo`, as a user runs it: it must finish by itself, exit 0, and report the
//! allowed call, both denials with their reasons, the policy change, the way from observed
//! traffic to an enforced least-privilege policy, and a rotation with no failed request.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Not a timing assertion: the demo takes well under a minute; this only stops a hung run.
const OUTER_TIMEOUT: Duration = Duration::from_secs(120);

/// The report line that starts with `call` (a report row is `  <caller> → <target> ...`).
fn row<'a>(report: &'a str, call: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.trim_start().starts_with(call))
        .unwrap_or_else(|| panic!("no row for {call:?} in:\n{report}"))
}

fn assert_has(line: &str, parts: &[&str], report: &str) {
    for p in parts {
        assert!(
            line.contains(p),
            "{p:?} missing from the row {line:?} of:\n{report}"
        );
    }
}

#[test]
fn the_demo_shows_allowed_and_denied_calls_and_a_rotation_then_exits() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("palisade demo starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > OUTER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("palisade demo did not finish within {OUTER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );

    assert!(
        out.contains("mode: explicit destinations over loopback"),
        "{out}"
    );
    assert_has(
        row(&out, "shop/web → shop/api"),
        &[
            "spiffe://cluster.local/ns/shop/sa/web",
            "ALLOW (HTTP 200)",
            "shop/api-from-web: rule_matched",
        ],
        &out,
    );
    // The first intruder row is the denial; the second, after the policy change, the allow.
    assert_has(
        row(&out, "shop/intruder → shop/api"),
        &[
            "spiffe://cluster.local/ns/shop/sa/intruder",
            "DENY (closed)",
            "shop/api-from-web: no_rule_matched",
        ],
        &out,
    );
    let after_change = out
        .lines()
        .filter(|l| l.trim_start().starts_with("shop/intruder → shop/api"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second intruder row in:\n{out}"));
    assert_has(after_change, &["ALLOW (HTTP 200)", "rule_matched"], &out);
    assert_has(
        row(&out, "outsider 127.0.10.9 → shop/api"),
        &[
            "none: plaintext from 127.0.10.9",
            "DENY (closed)",
            "plaintext_not_allowed",
        ],
        &out,
    );
    assert!(out.contains("applied to the api's proxy in"), "{out}");

    // Observe → suggest → audit → enforce: the suggested policy shuts the intruder out again.
    let least = out
        .split_once("Least privilege from observed traffic")
        .and_then(|(_, rest)| rest.split_once("\n\n"))
        .map(|(section, _)| section)
        .unwrap_or_else(|| panic!("no least-privilege section in:\n{out}"));
    assert_has(
        row(least, "suggested: MeshPolicy shop/api-"),
        &["-observed: allow shop/web on port", "mode audit"],
        &out,
    );
    let intruder: Vec<&str> = least
        .lines()
        .filter(|l| l.trim_start().starts_with("shop/intruder → shop/api"))
        .collect();
    assert_eq!(intruder.len(), 2, "audit and enforce rows of:\n{out}");
    assert_has(
        intruder[0],
        &["AUDIT_DENY (HTTP 200)", "-observed: no_rule_matched"],
        &out,
    );
    assert_has(
        intruder[1],
        &["DENY (closed)", "-observed: no_rule_matched"],
        &out,
    );
    assert_has(
        row(least, "shop/web → shop/api"),
        &["ALLOW (HTTP 200)", "default:all-authenticated"],
        &out,
    );
    let web_enforced = least
        .lines()
        .filter(|l| l.trim_start().starts_with("shop/web → shop/api"))
        .nth(1)
        .unwrap_or_else(|| panic!("no enforced row for shop/web in:\n{out}"));
    assert_has(
        web_enforced,
        &["ALLOW (HTTP 200)", "-observed: rule_matched"],
        &out,
    );

    // The Service: the callers' proxies balance over both replicas, over mTLS only.
    let service = out
        .split_once("Service shop/api (")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no Service section in:\n{out}"));
    for replica in ["shop/api-1: ", "shop/api-2: "] {
        assert_has(
            row(service, replica),
            &["of 20 calls", "ALLOW by shop/api-from-web"],
            &out,
        );
    }
    assert!(service.contains("over mTLS, 0 in plaintext"), "{out}");

    let rotation = out
        .split_once("Rotation")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no rotation section in:\n{out}"));
    for proxy in ["shop/web", "shop/api-1", "shop/api-2"] {
        let line = row(rotation, proxy);
        let serials: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.ends_with('…'))
            .collect();
        assert_eq!(serials.len(), 2, "{line:?} should show two serials:\n{out}");
        assert_ne!(
            serials[0], serials[1],
            "{line:?}: the serial did not change"
        );
    }
    assert!(
        rotation.contains(" requests, 0 failed"),
        "requests failed during the rotation:\n{out}"
    );
    let intermediate = out
        .split_once("Intermediate rotation")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no intermediate rotation section in:\n{out}"));
    let phases = row(intermediate, "phases:");
    // `retiring` lasts one step of the CA (a second) and may fall between two samples.
    for phase in ["issuing", "→ idle"] {
        assert!(phases.contains(phase), "{phases:?} lacks {phase}:\n{out}");
    }
    assert!(
        intermediate.contains(" requests, 0 failed"),
        "requests failed during the intermediate rotation:\n{out}"
    );
    assert!(out.contains("listeners closed"), "{out}");
}
