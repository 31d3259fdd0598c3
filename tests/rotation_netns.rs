//! A root rotation and then an intermediate rotation of a running mesh, under load, the way an
//! operator runs them (`palisade-ca rotate …` against the admin port): new connections and one
//! long-lived connection between two meshed pods lose nothing; the CA is killed in the middle
//! of each and resumes; at the end the bundle holds only the new root, every proxy presents a
//! chain to it (as `openssl` sees it), a leaf of the old root is refused by an inbound proxy,
//! the old keys are gone, and a proxy suspended through the whole rotation recovers through the
//! anchors file alone.
//!
//! Needs root (network namespaces, iptables) and the workspace's binaries; it prints why it is
//! skipped otherwise.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_ca_api::cert::{parse_pem_certs, sha256_fingerprint};
use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::netns;
use palisade_testkit::process::wait_for;
use support::node::{self, Node, Pod};

const BODY: &str = "rotation keeps this flowing";
const TOOLS: &[&str] = &["openssl", "kill"];
/// Leaves live a minute, so a suspended proxy's leaf runs out within the test.
const TTL: &str = "60s";

/// Lines every load script prints: `ok`, or `fail <curl exit code>`, then `done`.
const NEW_CONNECTIONS: &str = r#"i=0
while [ $i -lt 20000 ] && [ ! -e "$STOP" ]; do
  i=$((i+1))
  if curl -s -f --max-time 5 -o /dev/null "$URL"; then echo ok; else echo "fail $?"; fi
  sleep 0.05
done
echo done"#;

/// One TCP connection kept for the whole test: a line out, the same line back, five times a
/// second, until the stop file appears (at most 10 minutes).
const LONG_LIVED: &str = r#"import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 9000), timeout=10)
n, end = 0, time.time() + 600
while time.time() < end and not os.path.exists(sys.argv[2]):
    line = ("ping %d\n" % n).encode()
    s.sendall(line)
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            print("FAIL closed after %d" % n, flush=True)
            sys.exit(1)
        got += chunk
    if got != line:
        print("FAIL wrong echo after %d" % n, flush=True)
        sys.exit(1)
    n += 1
    time.sleep(0.2)
print("ok %d" % n, flush=True)
"#;

const ECHO_SERVER: &str = r#"import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
            self.wfile.flush()
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("0.0.0.0", 9000), Echo).serve_forever()
"#;

fn write_shared(node: &Node, name: &str, text: &str) -> PathBuf {
    let path = node.shared_path(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    path
}

fn fingerprint_of_pem(pem: &str) -> Vec<String> {
    parse_pem_certs(pem)
        .unwrap()
        .iter()
        .map(|c| sha256_fingerprint(c))
        .collect()
}

fn rotation_status(node: &Node) -> serde_json::Value {
    let out = node.ca_cli(&["rotate", "status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "rotate status --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn wait_phase(node: &Node, phase: &str) {
    wait_for(
        &format!("the rotation to reach {phase}"),
        Duration::from_secs(60),
        || rotation_status(node)["phase"] == phase,
    );
}

/// `rotate status --wait`: exit 0 once idle.
fn wait_idle(node: &Node, within: &str) {
    let out = node.ca_cli(&["rotate", "status", "--wait", within]);
    assert!(
        out.status.success(),
        "the rotation did not reach idle within {within}:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log("ca")
    );
}

/// Starts a rotation of `kind` and returns what the command printed.
fn rotate(node: &Node, kind: &str) -> String {
    let out = node.ca_cli(&["rotate", kind]);
    assert!(
        out.status.success(),
        "rotate {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A leaf for `sa` from the CA's API (as any client could ask), trusting `bundle`: the paths
/// of the leaf, the intermediate and the key.
fn request_leaf(node: &Node, sa: &str, bundle: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    // An hour: the leaf kept from before the rotation must still be valid after it, so that
    // only its retired root can make the proxy refuse it.
    let request = serde_json::json!({
        "csr": palisade_testkit::pki::csr_pem(&key, vec![]),
        "ttl_seconds": 3600,
    });
    let body = write_shared(node, &format!("{tag}-request.json"), &request.to_string());
    let token = node
        .in_node(&[
            node.bins.ca.to_str().unwrap(),
            "token",
            "--state-dir",
            node.ca_state_dir().to_str().unwrap(),
            "--namespace",
            node::NAMESPACE,
            "--service-account",
            sa,
        ])
        .stdout;
    let token = String::from_utf8(token).unwrap();
    let answer = netns::curl(
        &node.node_ns(),
        None,
        &[
            "-sS",
            "-f",
            "--max-time",
            "5",
            "--cacert",
            bundle.to_str().unwrap(),
            "--resolve",
            &format!("palisade-ca.palisade-system.svc:15012:{}", node.node_ip()),
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", body.display()),
            "https://palisade-ca.palisade-system.svc:15012/v1/certificates",
        ],
    )
    .expect("the CA issues a leaf");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let chain = answer["certificate_chain"].as_array().unwrap();
    let leaf = write_shared(node, &format!("{tag}-leaf.pem"), chain[0].as_str().unwrap());
    let intermediate = write_shared(
        node,
        &format!("{tag}-chain.pem"),
        chain[1].as_str().unwrap(),
    );
    let key_path = node.shared_path(&format!("{tag}-key.pem"));
    fs::write(&key_path, key.serialize_pem()).unwrap();
    (leaf, intermediate, key_path)
}

/// Whether `pod`'s inbound proxy admits a mesh caller presenting the leaf: the app's answer
/// comes back through it.
fn admitted(node: &Node, pod: &Pod, leaf: &(PathBuf, PathBuf, PathBuf)) -> bool {
    let script = format!(
        "printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | timeout 10 openssl s_client -quiet -ign_eof -alpn palisade/1 -cert {} -cert_chain {} -key {} -connect {}:8080",
        leaf.0.display(),
        leaf.1.display(),
        leaf.2.display(),
        pod.ip
    );
    let out = node.in_node(&["sh", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).contains(BODY)
}

/// Whether the chain `pod` presents verifies up to exactly `root` (a PEM file) with openssl.
fn presents_chain_to(node: &Node, pod: &Pod, root: &Path, tag: &str) -> bool {
    let chain = node.presented_chain(pod, 8080);
    let certs: Vec<&str> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    if certs.len() < 2 {
        return false;
    }
    let leaf = write_shared(node, &format!("{tag}-presented-leaf.pem"), certs[0]);
    let rest = write_shared(
        node,
        &format!("{tag}-presented-chain.pem"),
        &certs[1..].concat(),
    );
    let out = node.in_node(&[
        "openssl",
        "verify",
        "-partial_chain",
        "-CAfile",
        root.to_str().unwrap(),
        "-untrusted",
        rest.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    out.status.success()
}

#[test]
fn a_root_and_an_intermediate_rotation_under_load_lose_nothing() {
    let tools: Vec<&str> = node::TOOLS.iter().chain(TOOLS).copied().collect();
    if netns::skip("rotation_under_load", &tools) {
        return;
    }
    let mut node = Node::new(78);
    node.publish("hello.txt", BODY);
    let (web, api, late) = (
        node.add_pod("web", 2),
        node.add_pod("api", 3),
        node.add_pod("late", 4),
    );
    node.write_mesh(
        &MeshFile::new("all-authenticated")
            .workload("web", node::NAMESPACE, "web", &web.ip)
            .workload("api", node::NAMESPACE, "api", &api.ip)
            .workload("late", node::NAMESPACE, "late", &late.ip),
    );
    node.set_ca_args(&["--rotation", "manual", "--rotation-renew-window", "3s"]);
    node.start_ca(TTL);
    for (pod, sa) in [(&web, "web"), (&api, "api"), (&late, "late")] {
        node.mesh_pod(pod, sa, None);
    }
    node.serve_http(&api, 8080);
    node.serve_http(&late, 8080);
    let echo = write_shared(&node, "echo.py", ECHO_SERVER);
    node.spawn_app_script(
        &api,
        "api-echo",
        &format!("exec /usr/bin/python3 {}", echo.display()),
    );

    let state = node.ca_state_dir();
    let old_root_pem = fs::read_to_string(state.join("root.pem")).unwrap();
    let old_root = fingerprint_of_pem(&old_root_pem)[0].clone();
    let old_keys = (
        fs::read_to_string(state.join("root-key.pem")).unwrap(),
        fs::read_to_string(state.join("intermediate-key.pem")).unwrap(),
    );
    let old_leaf = request_leaf(&node, "web", &node.trust_bundle_file(), "old");
    assert!(
        admitted(&node, &api, &old_leaf),
        "control: a current leaf is admitted"
    );

    // Load: a new connection per request, and one connection kept throughout.
    let stop = node.shared_path("STOP");
    let url = format!("http://{}:8080/hello.txt", api.ip);
    node.spawn_app_script(
        &web,
        "load-new",
        &format!("STOP={} URL={url}\n{NEW_CONNECTIONS}", stop.display()),
    );
    let client = write_shared(&node, "long.py", LONG_LIVED);
    node.spawn_app_script(
        &web,
        "load-long",
        &format!(
            "exec /usr/bin/python3 {} {} {}",
            client.display(),
            api.ip,
            stop.display()
        ),
    );
    wait_for("load to flow", Duration::from_secs(20), || {
        node.log("load-new").lines().filter(|l| *l == "ok").count() >= 5
    });

    // A pod suspended through both rotations.
    node.signal_proxy(&late, "STOP");

    // Root rotation, the CA killed while it waits for the proxies.
    let started = rotate(&node, "root");
    let new_root = started
        .lines()
        .find_map(|l| l.strip_prefix("new root (SHA-256): "))
        .expect("the command prints the new root")
        .to_owned();
    assert_ne!(new_root, old_root);
    wait_phase(&node, "trusting");
    node.kill_ca();
    node.start_ca(TTL);
    assert_eq!(
        rotation_status(&node)["phase"],
        "trusting",
        "resumed after the restart"
    );
    wait_idle(&node, "240s");

    // Intermediate rotation, the CA killed while leaves drain.
    rotate(&node, "intermediate");
    wait_phase(&node, "issuing");
    node.kill_ca();
    node.start_ca(TTL);
    wait_idle(&node, "120s");
    // Requests still flow after both rotations.
    let before_stop = node.log("load-new").lines().filter(|l| *l == "ok").count();
    wait_for(
        "requests after the rotations",
        Duration::from_secs(20),
        || node.log("load-new").lines().filter(|l| *l == "ok").count() >= before_stop + 20,
    );

    fs::write(&stop, "").unwrap();
    wait_for("the load to stop", Duration::from_secs(30), || {
        node.log("load-new").contains("done") && !node.log("load-long").is_empty()
    });
    let new_log = node.log("load-new");
    let failed: Vec<&str> = new_log.lines().filter(|l| l.starts_with("fail")).collect();
    let ok = new_log.lines().filter(|l| *l == "ok").count();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    let long = node.log("load-long");
    assert!(long.starts_with("ok "), "the long-lived connection: {long}");
    assert!(ok > 100, "only {ok} requests made");

    // The bundle holds only the new root, and every proxy presents a chain to it.
    let status = rotation_status(&node);
    assert_eq!(
        status["trusted_roots"],
        serde_json::json!([new_root.clone()])
    );
    let bundle_pem = String::from_utf8(
        node.in_node(&[
            node.bins.ca.to_str().unwrap(),
            "bundle",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(fingerprint_of_pem(&bundle_pem), vec![new_root.clone()]);
    let new_bundle = write_shared(&node, "new-bundle.pem", &bundle_pem);
    let old_bundle = write_shared(&node, "old-root.pem", &old_root_pem);
    for pod in [&web, &api] {
        assert!(
            presents_chain_to(&node, pod, &new_bundle, &pod.name),
            "{} does not chain to the new root",
            pod.name
        );
        assert!(
            !presents_chain_to(&node, pod, &old_bundle, &pod.name),
            "{} still chains to the old root",
            pod.name
        );
    }

    // A leaf of the old root is refused; one of the new root is admitted.
    assert!(
        !admitted(&node, &api, &old_leaf),
        "a leaf of the retired root got in"
    );
    let new_leaf = request_leaf(&node, "web", &new_bundle, "new");
    assert!(
        admitted(&node, &api, &new_leaf),
        "control: a leaf of the new root is admitted"
    );

    // The old keys are gone from the state directory.
    assert_ne!(
        fs::read_to_string(state.join("root-key.pem")).unwrap(),
        old_keys.0
    );
    assert_ne!(
        fs::read_to_string(state.join("intermediate-key.pem")).unwrap(),
        old_keys.1
    );
    for leftover in [
        "rotation.json",
        "next-root.pem",
        "next-root-key.pem",
        "next-intermediate.pem",
        "next-intermediate-key.pem",
    ] {
        assert!(
            !state.join(leftover).exists(),
            "{leftover} is left in the state directory"
        );
    }

    // The suspended proxy missed everything: the anchors file (rewritten as the kubelet
    // rewrites the ConfigMap volume) is all it needs.
    node.publish_anchors();
    node.signal_proxy(&late, "CONT");
    let late_url = format!("http://{}:8080/hello.txt", late.ip);
    wait_for(
        "the suspended proxy to recover",
        Duration::from_secs(90),
        || node.app_get(&web, &late_url).is_ok_and(|b| b == BODY),
    );
    assert!(presents_chain_to(&node, &late, &new_bundle, "late"));
    node.finish();
}
