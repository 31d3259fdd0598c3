//! `palisade-proxy init` for real: as root, in a network namespace this test creates and
//! removes (a pod namespace and a peer namespace, 10.77.x.0/24 on a veth pair). Skipped, with the reason printed, when not root or
//! when `ip`/`iptables` are missing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_palisade-proxy");
const PY: &str = "/usr/bin/python3";

fn sh(cmd: &[&str]) -> std::process::Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &[&str]) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip", "iptables", "iptables-save"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!(
                "{tool} is not installed (apt-get install -y iptables iproute2)"
            ));
        }
    }
    if !std::path::Path::new(PY).exists() {
        return Some(format!("{PY} is missing"));
    }
    None
}

/// A pod namespace and a peer namespace joined by a veth pair, removed on drop. Nothing is
/// added to the host's own network namespace.
struct Netns {
    name: String,
    peer: String,
    host_ip: String,
    ns_ip: String,
    children: Vec<Child>,
}

impl Netns {
    fn create() -> Netns {
        let r = std::process::id() % 200 + 20;
        let name = format!("palisade-t-{}", std::process::id());
        let peer = format!("palisade-t-{}p", std::process::id());
        // The peer's address, standing for "another host".
        let host_ip = format!("10.77.{r}.1");
        let ns_ip = format!("10.77.{r}.2");
        for n in [&name, &peer] {
            let _ = sh(&["ip", "netns", "del", n]);
            ok(&["ip", "netns", "add", n]);
        }
        let n = Netns {
            name: name.clone(),
            peer: peer.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            children: vec![],
        };
        ok(&[
            "ip", "-n", &peer, "link", "add", "veth-out", "type", "veth", "peer", "name",
            "veth-pod",
        ]);
        ok(&["ip", "-n", &peer, "link", "set", "veth-pod", "netns", &name]);
        ok(&[
            "ip",
            "-n",
            &peer,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "veth-out",
        ]);
        ok(&["ip", "-n", &peer, "link", "set", "veth-out", "up"]);
        ok(&["ip", "-n", &peer, "link", "set", "lo", "up"]);
        n.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            "veth-pod",
        ]);
        n.exec(&["ip", "link", "set", "veth-pod", "up"]);
        n.exec(&["ip", "link", "set", "lo", "up"]);
        n
    }

    /// Runs `args` in the peer namespace.
    fn outside(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", self.peer.as_str()];
        v.extend_from_slice(args);
        ok(&v)
    }

    fn cmd<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        v
    }

    fn exec(&self, args: &[&str]) -> String {
        ok(&self.cmd(args))
    }

    fn spawn(&mut self, args: &[&str]) {
        let v = self.cmd(args);
        let child = Command::new(v[0])
            .args(&v[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespaces removes the veth pair with them.
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "netns", "del", &self.peer]);
    }
}

/// Answers "outbound" on 127.0.0.1:15001 and "inbound" on 0.0.0.0:15006, standing in for the
/// proxy's listeners.
const FAKE_PROXY: &str = r#"
import socket, threading
def serve(addr, word):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(word); c.close()
threading.Thread(target=serve, args=(("127.0.0.1", 15001), b"outbound"), daemon=True).start()
serve(("0.0.0.0", 15006), b"inbound")
"#;

/// Connects to host:port (as `uid` when given) and prints what it read or the error.
const CLIENT: &str = r#"
import socket, sys, os
if len(sys.argv) > 3: os.setuid(int(sys.argv[3]))
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(s.recv(64).decode() or "closed")
except Exception as e:
    print("error:", type(e).__name__)
"#;

enum Side<'a> {
    Pod(&'a Netns),
    Outside(&'a Netns),
}
use Side::{Outside, Pod};

fn connect_from(ns: Side<'_>, host: &str, port: u16, uid: Option<u32>) -> String {
    let port = port.to_string();
    let uid = uid.map(|u| u.to_string());
    let mut args = vec![PY, "-c", CLIENT, host, port.as_str()];
    if let Some(u) = uid.as_deref() {
        args.push(u);
    }
    let out = match ns {
        Pod(n) => n.exec(&args),
        Outside(n) => n.outside(&args),
    };
    out.trim().to_owned()
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.trim() == needle).count()
}

#[test]
fn init_redirects_an_apps_traffic_and_is_idempotent() {
    if let Some(reason) = skip_reason() {
        println!("SKIPPED init_redirects_an_apps_traffic_and_is_idempotent: {reason}");
        return;
    }
    let mut ns = Netns::create();
    let dry = ns.exec(&[BIN, "init", "--dry-run"]);
    assert!(
        dry.contains("-t nat -A OUTPUT -p tcp -j PALISADE_OUTBOUND"),
        "{dry}"
    );
    assert!(
        !ns.exec(&["iptables-save", "-t", "nat"])
            .contains("PALISADE"),
        "--dry-run changed nothing"
    );

    ns.exec(&[BIN, "init", "--skip-inbound-ports", "2222"]);
    ns.spawn(&[PY, "-c", FAKE_PROXY]);
    std::thread::sleep(Duration::from_millis(500));

    // The app's outbound connection to another address lands on the outbound port ...
    let host_ip = ns.host_ip.clone();
    let ns_ip = ns.ns_ip.clone();
    assert_eq!(connect_from(Pod(&ns), &host_ip, 80, None), "outbound");
    // ... but never the proxy's own (uid 1337): it would loop.
    assert!(connect_from(Pod(&ns), &host_ip, 80, Some(1337)).starts_with("error"));
    // A caller from another host lands on the inbound port ...
    assert_eq!(connect_from(Outside(&ns), &ns_ip, 8080, None), "inbound");
    // ... except on the admin port and skipped ports, which reach the (absent) app directly.
    assert!(connect_from(Outside(&ns), &ns_ip, 15021, None).starts_with("error"));
    assert!(connect_from(Outside(&ns), &ns_ip, 2222, None).starts_with("error"));

    let saved = |ns: &Netns| {
        let a = ns.exec(&["iptables-nft-save", "-t", "nat"]);
        let b = ns.exec(&["iptables-legacy-save", "-t", "nat"]);
        format!("{a}\n{b}")
    };
    let first = saved(&ns);
    ns.exec(&[BIN, "init", "--skip-inbound-ports", "2222"]);
    let second = saved(&ns);
    assert_eq!(
        count(&second, "-A PREROUTING -p tcp -j PALISADE_INBOUND"),
        1,
        "{second}"
    );
    assert_eq!(
        count(&second, "-A OUTPUT -p tcp -j PALISADE_OUTBOUND"),
        1,
        "{second}"
    );
    let rules = |t: &str| t.lines().filter(|l| l.starts_with("-A PALISADE_")).count();
    assert_eq!(rules(&first), rules(&second));
    assert!(rules(&second) >= 7, "{second}");
    // Still working after the second run.
    assert_eq!(connect_from(Pod(&ns), &host_ip, 80, None), "outbound");
}
