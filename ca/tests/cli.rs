//! The binary end to end, as a newcomer would use it: `palisade-ca serve` in embedded mode, a CSR
//! made by `openssl req`, a token from `palisade-ca token`, sent by `curl`, verified by openssl.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_palisade-ca");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, api: u16, admin: u16) -> Server {
    std::fs::write(
        dir.join("mesh.yaml"),
        "workloads: [{name: web, namespace: shop, serviceAccount: web, ips: [10.77.0.2]}]\n",
    )
    .unwrap();
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--state-dir"])
            .arg(dir.join("state"))
            .args(["--source", "file", "--mesh-file"])
            .arg(dir.join("mesh.yaml"))
            .args([
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{admin}/ready")])
            .output()
            .map(|o| o.status.success());
        if ok.unwrap_or(false) {
            return server;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("palisade-ca did not become ready");
}

#[test]
fn openssl_csr_curl_and_token_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let mut server = start(dir.path(), api, admin);
    let state = dir.path().join("state");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        run(Command::new(BIN)
            .args(["bundle", "--state-dir"])
            .arg(&state)),
    )
    .unwrap();
    let token = run(Command::new(BIN)
        .args(["token", "--state-dir"])
        .arg(&state)
        .args(["--namespace", "shop", "--service-account", "web"]));
    let token = token.trim();
    let key = dir.path().join("key.pem");
    let csr = run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
        ])
        .arg(&key)
        .args(["-subj", "/O=shop"]));
    let body = serde_json::json!({ "csr": csr }).to_string();
    let answer = run(Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&bundle)
        .args([
            "--resolve",
            &format!("palisade-ca.palisade-system.svc:{api}:127.0.0.1"),
        ])
        .args([
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ])
        .arg(format!(
            "https://palisade-ca.palisade-system.svc:{api}/v1/certificates"
        )));
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    let leaf = dir.path().join("leaf.pem");
    let inter = dir.path().join("inter.pem");
    std::fs::write(&leaf, answer["certificate_chain"][0].as_str().unwrap()).unwrap();
    std::fs::write(&inter, answer["certificate_chain"][1].as_str().unwrap()).unwrap();
    let verified = run(Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&bundle)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf));
    assert!(verified.contains(": OK"), "{verified}");

    // SIGTERM: a clean exit, and one audit line that carries no secret.
    let pid = server.0.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let status = server.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let stdout = BufReader::new(server.0.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    assert_eq!(stdout.len(), 1, "{stdout:?}");
    let audit: serde_json::Value = serde_json::from_str(&stdout[0]).unwrap();
    assert_eq!(audit["audit"], "certificate_issued");
    assert_eq!(audit["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(audit["authenticator"], "local");
    assert_eq!(audit["serial"].as_str().unwrap().len(), 32);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut server.0.stderr.take().unwrap(), &mut stderr).unwrap();
    let key_text = std::fs::read_to_string(state.join("root-key.pem")).unwrap();
    let key_body = key_text.lines().nth(1).unwrap();
    for secret in [token, key_body, csr.lines().nth(1).unwrap()] {
        assert!(
            !stdout[0].contains(secret) && !stderr.contains(secret),
            "a secret reached the logs"
        );
    }
}

#[test]
fn bad_flags_name_the_problem() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--state-dir",
            "/tmp/x",
            "--mesh-file",
            "/tmp/m",
            "--cert-ttl",
            "2m",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cert-ttl") && err.contains("5m..24h"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args([
            "serve",
            "--state-dir",
            "/tmp/x",
            "--mesh-file",
            "/tmp/m",
            "--cert-ttl",
            "soon",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let out = Command::new(BIN)
        .args(["serve", "--state-dir"])
        .arg(dir.path())
        .arg("--mesh-file")
        .arg(&missing)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope.yaml"), "{err}");
}

/// `palisade-ca rotate intermediate --from-cert F --from-key F --chain F`: the three flags go
/// together, relative paths reach the running CA as the files beside the command, and an
/// intermediate of a new root starts a root rotation.
#[test]
fn rotate_intermediate_from_an_offline_root_reaches_the_admin_port() {
    let dir = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let _server = start(dir.path(), api, admin);
    let admin = format!("127.0.0.1:{admin}");
    let root = support::operator_root(dir.path(), "offline");
    support::operator_intermediate(dir.path(), "theirs", &root);
    let alone = Command::new(BIN)
        .current_dir(dir.path())
        .args(["rotate", "intermediate", "--admin-addr", &admin])
        .args(["--from-cert", "theirs.pem"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && err.contains("--from-key") && err.contains("--chain"),
        "{err}"
    );

    let out = run(Command::new(BIN)
        .current_dir(dir.path())
        .args(["rotate", "intermediate", "--admin-addr", &admin])
        .args(["--from-cert", "theirs.pem", "--from-key", "theirs-key.pem"])
        .args(["--chain", "theirs-chain.pem"]));
    let theirs = palisade_ca_api::cert::sha256_fingerprint(
        &palisade_ca_api::cert::parse_pem_certs(&std::fs::read_to_string(&root.0).unwrap())
            .unwrap()[0],
    );
    assert!(
        out.contains("rotation started: phase trusting")
            && out.contains(&format!("new root (SHA-256): {theirs}")),
        "{out}"
    );
    let status = Command::new(BIN)
        .args(["rotate", "status", "--json", "--admin-addr", &admin])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1), "not idle yet");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["kind"], "root");
    assert_eq!(status["trusted_roots"][1], theirs.as_str());
    assert_eq!(
        status["root_key_held"], true,
        "the current root still issues"
    );
}
