//! A "node" for whole-system tests: a bridge in a network namespace of its own, "pods" that are
//! network namespaces joined to it by veth pairs, the CA on the node, and in each meshed pod
//! `palisade-proxy init` then `palisade-proxy run` as uid 1337 next to an unmodified app that
//! runs as another uid — the way a cluster runs them.
//!
//! Everything a node creates (namespaces, links, processes, files) is removed when it is
//! dropped, also when the test fails; [`Node::finish`] checks that nothing was left behind.
//! Needs root; [`TOOLS`] lists what else it needs (see `palisade_testkit::netns::skip`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade_testkit::capture::{self, Capture};
use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::netns::{self, Namespaces, run_ok};
use palisade_testkit::process::{ProcessId, Processes, wait_for};

/// The uid the proxy runs as (its traffic is never captured).
pub const PROXY_UID: u32 = 1337;
/// The uid apps run as: anything but root and the proxy.
pub const APP_UID: u32 = 1000;
/// The namespace every workload of these tests lives in.
pub const NAMESPACE: &str = "shop";
const APP_PY: &str = "/usr/bin/python3";
/// What a node runs besides the workspace's binaries.
pub const TOOLS: &[&str] = &["iptables", "curl", "setpriv", "tcpdump", APP_PY];

/// Paths of the binaries under test: built next to the `palisade` binary of this package.
#[derive(Clone)]
pub struct Bins {
    pub ca: PathBuf,
    pub proxy: PathBuf,
}

impl Bins {
    /// Panics with the command to run when the workspace binaries are not built: a root run
    /// must not pass without exercising them.
    pub fn locate() -> Bins {
        let dir = Path::new(env!("CARGO_BIN_EXE_palisade"))
            .parent()
            .expect("the palisade binary has a directory")
            .to_path_buf();
        let bins = Bins {
            ca: dir.join("palisade-ca"),
            proxy: dir.join("palisade-proxy"),
        };
        for b in [&bins.ca, &bins.proxy] {
            assert!(
                b.exists(),
                "{} is missing: build the workspace's binaries first (cargo build --workspace --bins), \
                 as scripts/test.sh does",
                b.display()
            );
        }
        bins
    }
}

/// A pod: a network namespace with one address on the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

/// One node: see the module documentation.
pub struct Node {
    // Fields drop in this order: processes stop (printing their logs after a failure) before
    // their namespaces go, and the directory holding the logs goes last.
    procs: Processes,
    namespaces: Namespaces,
    tag: String,
    net: u8,
    bridge_ns: String,
    ca: Option<ProcessId>,
    ca_stops: usize,
    pub bins: Bins,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A node with the bridge `10.77.<net>.1/24`; `net` also keeps names apart between tests.
    pub fn new(net: u8) -> Node {
        let tag = format!("{}n{net}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("palisade-node-")
            .tempdir()
            .expect("temporary directory");
        // Pods run as other uids and read their token, the anchors and the app's files here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(dir.path().join("www")).unwrap();
        fs::set_permissions(dir.path().join("www"), fs::Permissions::from_mode(0o755)).unwrap();
        let bridge_ns = format!("pal{tag}-node");
        let mut namespaces = Namespaces::new();
        namespaces.add(&bridge_ns);
        namespaces.bridge(&bridge_ns, "br0", &format!("10.77.{net}.1/24"));
        Node {
            procs: Processes::new(dir.path()),
            namespaces,
            tag,
            net,
            bridge_ns,
            ca: None,
            ca_stops: 0,
            bins: Bins::locate(),
            dir,
        }
    }

    /// The node's own address (where the CA listens).
    pub fn node_ip(&self) -> String {
        format!("10.77.{}.1", self.net)
    }

    /// The address a pod with host number `host` gets.
    pub fn pod_ip(&self, host: u8) -> String {
        format!("10.77.{}.{host}", self.net)
    }

    /// A pod named `name` at host number `host`, joined to the bridge by a veth pair.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Pod {
        let netns = format!("pal{}-{name}", self.tag);
        self.namespaces.add(&netns);
        let outer = format!("v{}h{host}b", self.tag);
        let ip = self.pod_ip(host);
        self.namespaces
            .veth((&netns, "eth0"), (&self.bridge_ns, &outer));
        self.namespaces.address(&netns, "eth0", &format!("{ip}/24"));
        self.namespaces.attach(&self.bridge_ns, "br0", &outer);
        Pod {
            name: name.to_owned(),
            netns,
            ip,
        }
    }

    /// The log of a process started by this node.
    pub fn log(&self, what: &str) -> String {
        self.procs.log(what)
    }

    fn mesh_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// Writes the mesh file the way an editor or a config tool does: a new file renamed over
    /// the old one.
    pub fn write_mesh(&self, mesh: &MeshFile) {
        mesh.write(&self.mesh_path());
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts (or restarts, with the same state directory) the CA on the node, file source
    /// and local tokens, certificates of lifetime `ttl`; waits until it is ready.
    pub fn start_ca(&mut self, ttl: &str) {
        assert!(self.ca.is_none(), "the CA is already running");
        let ip = self.node_ip();
        let mut cmd = netns::command(&self.bridge_ns, None, &self.bins.ca);
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--source", "file", "--mesh-file"])
            .arg(self.mesh_path())
            .args(["--auth", "local", "--cert-ttl", ttl])
            .args(["--listen", &format!("{ip}:15012")])
            .args(["--admin-listen", &format!("{ip}:15014")])
            .env("PALISADE_LOG", "info");
        let ttl_secs = palisade_ca_api::contract::parse_duration(ttl)
            .unwrap_or_else(|e| panic!("certificate lifetime: {e}"))
            .as_secs();
        if ttl_secs < 300 {
            cmd.arg("--allow-short-ttl-for-testing");
        }
        self.ca = Some(self.procs.spawn("ca", cmd));
        let url = format!("http://{ip}:15014/ready");
        wait_for(
            &format!("the CA to be ready ({url})"),
            Duration::from_secs(30),
            || netns::curl(&self.bridge_ns, None, &["-sf", "--max-time", "1", &url]).is_ok(),
        );
        let bundle = self.trust_bundle_file();
        if !bundle.exists() {
            let out = run_ok(
                Command::new(&self.bins.ca)
                    .arg("bundle")
                    .arg("--state-dir")
                    .arg(self.state_dir()),
            );
            fs::write(&bundle, out.stdout).unwrap();
            fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644)).unwrap();
        }
    }

    /// Stops the CA (SIGTERM) and waits for it to exit.
    pub fn stop_ca(&mut self) {
        let ca = self.ca.take().expect("the CA is running");
        self.procs.stop(ca);
        // Keep its log: a restart appends to a new file name.
        self.ca_stops += 1;
        let old = self.procs.log_path("ca");
        let _ = fs::rename(
            &old,
            self.procs
                .log_path(&format!("ca-stopped-{}", self.ca_stops)),
        );
    }

    /// The trust bundle the pods were started with (the root at first start).
    pub fn trust_bundle_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The trust bundle the running CA serves on `GET /v1/trust-bundle`.
    pub fn served_trust_bundle(&self) -> String {
        let ip = self.node_ip();
        netns::curl(
            &self.bridge_ns,
            None,
            &[
                "-sf",
                "--max-time",
                "5",
                "--cacert",
                &self.trust_bundle_file().to_string_lossy(),
                "--resolve",
                &format!("palisade-ca.palisade-system.svc:15012:{ip}"),
                "https://palisade-ca.palisade-system.svc:15012/v1/trust-bundle",
            ],
        )
        .expect("the CA serves its trust bundle")
    }

    /// A service-account token for `sa`, readable by the proxy's uid only.
    fn token(&self, sa: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{sa}.token"));
        let out = run_ok(
            Command::new(&self.bins.ca)
                .arg("token")
                .arg("--state-dir")
                .arg(self.state_dir())
                .args([
                    "--namespace",
                    NAMESPACE,
                    "--service-account",
                    sa,
                    "--ttl",
                    "1h",
                ]),
        );
        fs::write(&path, out.stdout).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        run_ok(Command::new("chown").arg(PROXY_UID.to_string()).arg(&path));
        path
    }

    /// Meshes `pod` as service account `sa`: `palisade-proxy init`, then `palisade-proxy run`
    /// as uid 1337; waits until the proxy is ready. `claimed_ip` is the pod IP the proxy tells
    /// the control plane (normally the pod's own).
    pub fn mesh_pod(&mut self, pod: &Pod, sa: &str, claimed_ip: Option<&str>) {
        let init = netns::command(&pod.netns, None, &self.bins.proxy)
            .arg("init")
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "palisade-proxy init in {}: {}",
            pod.name,
            String::from_utf8_lossy(&init.stderr)
        );
        let token = self.token(sa);
        let mut cmd = netns::command(&pod.netns, Some(PROXY_UID), &self.bins.proxy);
        cmd.arg("run")
            .env("PALISADE_CA_ADDR", format!("{}:15012", self.node_ip()))
            .env("PALISADE_CA_NAME", "palisade-ca.palisade-system.svc")
            .env("PALISADE_TRUST_ANCHORS", self.trust_bundle_file())
            .env("PALISADE_TOKEN_FILE", token)
            .env("PALISADE_NAMESPACE", NAMESPACE)
            .env("PALISADE_SERVICE_ACCOUNT", sa)
            .env("PALISADE_POD_NAME", format!("{}-0", pod.name))
            .env("PALISADE_POD_IP", claimed_ip.unwrap_or(&pod.ip))
            .env("PALISADE_LOG", "info")
            .env("PALISADE_LOG_FORMAT", "json")
            // A first call to a new destination waits for the control plane's answer; on a
            // loaded CI machine (debug builds, several nodes at once) the default 2 s has been
            // exceeded once. These scenarios are about what the answer does, not how fast it is.
            .env("PALISADE_DESTINATION_WAIT", "5s");
        self.procs.spawn(&format!("{}-proxy", pod.name), cmd);
        let wait = netns::command(&pod.netns, None, &self.bins.proxy)
            .args(["wait-ready", "--timeout", "30s"])
            .output()
            .unwrap();
        assert!(
            wait.status.success(),
            "the proxy of {} did not get ready: {}\n{}",
            pod.name,
            String::from_utf8_lossy(&wait.stderr),
            self.log(&format!("{}-proxy", pod.name))
        );
    }

    /// Serves `www/` over HTTP on `port` in `pod`: `python3 -m http.server`, as the app uid.
    pub fn serve_http(&mut self, pod: &Pod, port: u16) {
        let www = self.dir.path().join("www");
        let mut cmd = netns::command(&pod.netns, Some(APP_UID), APP_PY);
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"])
            .arg("--directory")
            .arg(&www);
        self.procs.spawn(&format!("{}-app-{port}", pod.name), cmd);
        let url = format!("http://127.0.0.1:{port}/");
        wait_for(
            &format!("the app of {} on port {port}", pod.name),
            Duration::from_secs(15),
            || netns::curl(&pod.netns, None, &["-sf", "--max-time", "1", &url]).is_ok(),
        );
    }

    /// Writes a file the apps serve.
    pub fn publish(&self, name: &str, body: &str) {
        let p = self.dir.path().join("www").join(name);
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// The app in `pod` (as the app uid, so its traffic is captured) fetches `url`.
    pub fn app_get(&self, pod: &Pod, url: &str) -> Result<String, String> {
        netns::curl(
            &pod.netns,
            Some(APP_UID),
            &["-sS", "-f", "--max-time", "5", url],
        )
    }

    /// A path of the proxy's admin listener in `pod`.
    pub fn admin(&self, pod: &Pod, path: &str) -> String {
        netns::curl(
            &pod.netns,
            None,
            &[
                "-sf",
                "--max-time",
                "3",
                &format!("http://127.0.0.1:15021{path}"),
            ],
        )
        .unwrap_or_else(|e| panic!("admin {path} of {}: {e}", pod.name))
    }

    /// The value of one metric series (`name{labels}` exactly as rendered), 0 when absent.
    pub fn metric(&self, pod: &Pod, series: &str) -> f64 {
        self.admin(pod, "/metrics")
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    /// The serial of the certificate the proxy in `pod` presents now.
    pub fn serial(&self, pod: &Pod) -> String {
        let body = self.admin(pod, "/identity");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/identity of {} is not JSON ({e}): {body}", pod.name));
        v["serial"].as_str().unwrap_or_default().to_owned()
    }

    /// Starts a packet capture of TCP `port` on `pod`'s link; returns once it is listening.
    pub fn capture(&mut self, pod: &Pod, port: u16) -> Capture {
        let file = self.dir.path().join(format!("{}-{port}.pcap", pod.name));
        let what = format!("{}-tcpdump-{port}", pod.name);
        capture::start(&mut self.procs, &what, &pod.netns, "eth0", port, &file)
    }

    /// Stops a capture and returns the captured bytes (pcap).
    pub fn finish_capture(&mut self, c: Capture) -> Vec<u8> {
        c.finish(&mut self.procs)
    }

    /// Stops everything and checks that no namespace or process of this node is left.
    pub fn finish(mut self) {
        self.procs.stop_all();
        self.namespaces.remove_all();
        let left = netns::existing(&format!("pal{}-", self.tag));
        assert!(left.is_empty(), "network namespaces left behind: {left:?}");
        self.procs.assert_all_exited();
    }
}
