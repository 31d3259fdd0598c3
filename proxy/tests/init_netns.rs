//! `palisade-proxy init` for real: as root, in a network namespace this test creates and
//! removes (a pod namespace and a peer namespace, 10.77.x.0/24 on a veth pair). Skipped, with the reason printed, when not root or
//! when `ip`/`iptables` are missing.

use std::time::Duration;

use palisade_testkit::netns::{self, Namespaces};
use palisade_testkit::process::Processes;

const BIN: &str = env!("CARGO_BIN_EXE_palisade-proxy");
const PY: &str = "/usr/bin/python3";

/// A pod namespace and a peer namespace joined by a veth pair, removed on drop with what runs
/// in them. Nothing is added to the host's own network namespace.
struct Netns {
    // Processes stop before their namespaces go.
    procs: Processes,
    _namespaces: Namespaces,
    _logs: tempfile::TempDir,
    name: String,
    peer: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let r = std::process::id() % 200 + 20;
        let name = format!("palisade-t-{}", std::process::id());
        let peer = format!("palisade-t-{}p", std::process::id());
        // The peer's address, standing for "another host".
        let host_ip = format!("10.77.{r}.1");
        let ns_ip = format!("10.77.{r}.2");
        let mut namespaces = Namespaces::new();
        namespaces.add(&name);
        namespaces.add(&peer);
        namespaces.veth((&peer, "veth-out"), (&name, "veth-pod"));
        namespaces.address(&peer, "veth-out", &format!("{host_ip}/24"));
        namespaces.address(&name, "veth-pod", &format!("{ns_ip}/24"));
        let logs = tempfile::tempdir().unwrap();
        Netns {
            procs: Processes::new(logs.path()),
            _namespaces: namespaces,
            _logs: logs,
            name,
            peer,
            host_ip,
            ns_ip,
        }
    }

    /// Runs `args` in the peer namespace.
    fn outside(&self, args: &[&str]) -> String {
        netns::exec(&self.peer, args)
    }

    fn exec(&self, args: &[&str]) -> String {
        netns::exec(&self.name, args)
    }

    fn spawn(&mut self, what: &str, args: &[&str]) {
        let mut cmd = netns::command(&self.name, None, args[0]);
        cmd.args(&args[1..]);
        self.procs.spawn(what, cmd);
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
    if netns::skip(
        "init_redirects_an_apps_traffic_and_is_idempotent",
        &["iptables", "iptables-save", PY],
    ) {
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
    ns.spawn("fake-proxy", &[PY, "-c", FAKE_PROXY]);
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
