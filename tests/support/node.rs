//! A "node" for whole-system tests: a network namespace of its own, "pods" that are network
//! namespaces joined to it by veth pairs, the CA on the node, and in each meshed pod
//! `palisade-proxy init` then `palisade-proxy run` as uid 1337 next to an unmodified app that
//! runs as another uid — the way a cluster runs them.
//!
//! Two shapes: [`Node::new`] puts the pods on one bridge (one L2 segment, the node sees only
//! what is addressed to it); [`Node::routed`] routes every pod's traffic through the node the
//! way Calico does and runs kube-proxy's Service rules there (see `routed.rs`).
//!
//! Everything a node creates (namespaces, links, processes, files) is removed when it is
//! dropped, also when the test fails; [`Node::finish`] checks that nothing was left behind.
//! Needs root; [`TOOLS`] lists what else it needs (see `palisade_testkit::netns::skip`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade_testkit::capture::{self, Capture};
use palisade_testkit::mesh_file::MeshFile;
use palisade_testkit::netns::{self, Namespaces, run_ok};
use palisade_testkit::process::{ProcessId, Processes, wait_for};

use super::routed::{self, KubeProxy};

mod rotation;

/// The uid the proxy runs as (its traffic is never captured).
pub const PROXY_UID: u32 = 1337;
/// The uid apps run as: anything but root and the proxy.
pub const APP_UID: u32 = 1000;
/// The namespace every workload of these tests lives in.
pub const NAMESPACE: &str = "shop";
const APP_PY: &str = "/usr/bin/python3";
/// What a node runs besides the workspace's binaries.
pub const TOOLS: &[&str] = &["iptables", "curl", "setpriv", "tcpdump", APP_PY];
/// What a routed node runs besides [`TOOLS`].
pub const ROUTED_TOOLS: &[&str] = &["iptables-restore", "iptables-save", "sysctl"];

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

/// A pod: a network namespace with one address, on the node's bridge or routed by the node.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

/// How pods reach each other and the node.
enum Links {
    /// One bridge `br0`, the node's address on it.
    Bridge,
    /// Point-to-point links routed by the node, which also runs kube-proxy's rules.
    Routed(KubeProxy),
}

/// One node: see the module documentation.
pub struct Node {
    // Fields drop in this order: processes stop (printing their logs after a failure) before
    // their namespaces go, and the directory holding the logs goes last.
    procs: Processes,
    namespaces: Namespaces,
    tag: String,
    net: u8,
    node_ns: String,
    links: Links,
    ca: Option<ProcessId>,
    ca_stops: usize,
    ca_dual_stack: bool,
    /// More flags for `palisade-ca serve`.
    ca_args: Vec<String>,
    proxies: HashMap<String, ProcessId>,
    proxy_log: String,
    pub bins: Bins,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A node with the bridge `10.77.<net>.1/24`; `net` also keeps names apart between tests.
    pub fn new(net: u8) -> Node {
        let node = Node::empty(net);
        node.namespaces
            .bridge(&node.node_ns, "br0", &format!("{}/24", node.node_ip()));
        node
    }

    /// A node that routes its pods' traffic (Calico's shape) and applies Services the way
    /// kube-proxy's iptables mode does ([`Node::install_service`]). The node's address is
    /// `10.77.<net>.1`, pods get `10.77.<net>.<host>/32`.
    pub fn routed(net: u8) -> Node {
        let mut node = Node::empty(net);
        routed::plumb_node(&node.node_ns, &node.node_ip());
        node.links = Links::Routed(KubeProxy::new(&node.node_ns));
        node
    }

    fn empty(net: u8) -> Node {
        let tag = format!("{}n{net}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("palisade-node-")
            .tempdir()
            .expect("temporary directory");
        // Pods run as other uids and read their token, the anchors and the app's files here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(dir.path().join("www")).unwrap();
        fs::set_permissions(dir.path().join("www"), fs::Permissions::from_mode(0o755)).unwrap();
        let node_ns = format!("pal{tag}-node");
        let mut namespaces = Namespaces::new();
        namespaces.add(&node_ns);
        Node {
            procs: Processes::new(dir.path()),
            namespaces,
            tag,
            net,
            node_ns,
            links: Links::Bridge,
            ca: None,
            ca_stops: 0,
            ca_dual_stack: false,
            ca_args: Vec::new(),
            proxies: HashMap::new(),
            proxy_log: "info".into(),
            bins: Bins::locate(),
            dir,
        }
    }

    /// The tracing filter (`PALISADE_LOG`) of proxies meshed from now on; `info` by default.
    pub fn set_proxy_log(&mut self, filter: &str) {
        self.proxy_log = filter.to_owned();
    }

    /// The node's own address (where the CA listens).
    pub fn node_ip(&self) -> String {
        format!("10.77.{}.1", self.net)
    }

    /// The address a pod with host number `host` gets.
    pub fn pod_ip(&self, host: u8) -> String {
        format!("10.77.{}.{host}", self.net)
    }

    /// The IPv6 address a pod with host number `host` gets from [`Node::add_ipv6`].
    pub fn pod_ip6(&self, host: u8) -> String {
        format!("fd00:77:{}::{host}", self.net)
    }

    /// A pod with an IPv6 address only ([`Node::pod_ip6`]), as an IPv6-only cluster gives it;
    /// its proxy reaches the CA over IPv6 (see [`Node::ca_on_both_families`]). Bridge nodes only.
    pub fn add_ipv6_only_pod(&mut self, name: &str, host: u8) -> Pod {
        assert!(matches!(self.links, Links::Bridge), "bridge nodes only");
        let netns = format!("pal{}-{name}", self.tag);
        self.namespaces.add(&netns);
        let outer = format!("v{}h{host}b", self.tag);
        self.namespaces
            .veth((&netns, "eth0"), (&self.node_ns, &outer));
        netns::ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        self.namespaces.attach(&self.node_ns, "br0", &outer);
        let mut pod = Pod {
            name: name.to_owned(),
            netns,
            ip: String::new(),
        };
        pod.ip = self.add_ipv6(&pod, host);
        pod
    }

    /// Makes `pod` dual-stack, as a dual-stack cluster does: [`Node::pod_ip6`] on its `eth0`
    /// (and the node's `fd00:77:<net>::1/64` on the bridge, once). Bridge nodes only.
    pub fn add_ipv6(&mut self, pod: &Pod, host: u8) -> String {
        assert!(matches!(self.links, Links::Bridge), "bridge nodes only");
        let node6 = format!("fd00:77:{}::1/64", self.net);
        let bridge_has = netns::exec(&self.node_ns, &["ip", "-6", "addr", "show", "dev", "br0"]);
        if !bridge_has.contains(&node6) {
            netns::ip(&[
                "-n",
                &self.node_ns,
                "addr",
                "add",
                &node6,
                "dev",
                "br0",
                "nodad",
            ]);
        }
        let ip6 = self.pod_ip6(host);
        netns::ip(&[
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip6
    }

    /// A pod named `name` at host number `host`, joined to the node by a veth pair (on the
    /// bridge, or routed).
    pub fn add_pod(&mut self, name: &str, host: u8) -> Pod {
        let netns = format!("pal{}-{name}", self.tag);
        self.namespaces.add(&netns);
        let outer = format!("v{}h{host}b", self.tag);
        let ip = self.pod_ip(host);
        match self.links {
            Links::Bridge => {
                self.namespaces
                    .veth((&netns, "eth0"), (&self.node_ns, &outer));
                self.namespaces.address(&netns, "eth0", &format!("{ip}/24"));
                self.namespaces.attach(&self.node_ns, "br0", &outer);
            }
            Links::Routed(_) => {
                routed::plumb_pod(&self.namespaces, &self.node_ns, &netns, &outer, &ip);
            }
        }
        Pod {
            name: name.to_owned(),
            netns,
            ip,
        }
    }

    /// kube-proxy's part: the Service port `cluster_ip:port` now sends new connections to
    /// `endpoints` (pod address, target port), chosen at random; none refuses them. Replaces
    /// what was installed for that Service port before. Routed nodes only.
    pub fn install_service(&mut self, cluster_ip: &str, port: u16, endpoints: &[(&str, u16)]) {
        self.kube_proxy()
            .install_service(cluster_ip, port, endpoints);
    }

    /// How many connections the node's Service rules have balanced to `cluster_ip:port`.
    pub fn dnat_packets(&mut self, cluster_ip: &str, port: u16) -> u64 {
        self.kube_proxy().dnat_packets(cluster_ip, port)
    }

    /// The node's iptables rules with their counters, for failure messages.
    pub fn node_rules(&mut self) -> String {
        self.kube_proxy().dump()
    }

    fn kube_proxy(&mut self) -> &mut KubeProxy {
        match &mut self.links {
            Links::Routed(kp) => kp,
            Links::Bridge => panic!("Services need a routed node (Node::routed)"),
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

    /// The CA started from now on listens on every address of both families (for pods with
    /// IPv6 only); proxies of such pods are given `PALISADE_CA_ADDR=[fd00:77:<net>::1]:15012`.
    pub fn ca_on_both_families(&mut self) {
        self.ca_dual_stack = true;
    }

    /// Starts (or restarts, with the same state directory) the CA on the node, file source
    /// and local tokens, certificates of lifetime `ttl`; waits until it is ready.
    pub fn start_ca(&mut self, ttl: &str) {
        assert!(self.ca.is_none(), "the CA is already running");
        let ip = self.node_ip();
        // `[::]` is one socket for both families: IPv6-only pods reach the CA too.
        let listen = if self.ca_dual_stack {
            "[::]:15012".to_owned()
        } else {
            format!("{ip}:15012")
        };
        let mut cmd = netns::command(&self.node_ns, None, &self.bins.ca);
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--source", "file", "--mesh-file"])
            .arg(self.mesh_path())
            .args(["--auth", "local", "--cert-ttl", ttl])
            .args(["--listen", &listen])
            // All addresses, as in a pod: `palisade-ca rotate` talks to it over loopback.
            .args(["--admin-listen", "0.0.0.0:15014"])
            .args(&self.ca_args)
            // PALISADE_TEST_CA_LOG (e.g. `debug,h2=debug`) when a failure needs more.
            .env(
                "PALISADE_LOG",
                std::env::var("PALISADE_TEST_CA_LOG").unwrap_or_else(|_| "info".into()),
            );
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
            || netns::curl(&self.node_ns, None, &["-sf", "--max-time", "1", &url]).is_ok(),
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
        self.keep_ca_log();
    }

    /// Kills the CA (SIGKILL), as a crash or an evicted pod would.
    pub fn kill_ca(&mut self) {
        let ca = self.ca.take().expect("the CA is running");
        self.procs.kill(ca);
        self.keep_ca_log();
    }

    fn keep_ca_log(&mut self) {
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
            &self.node_ns,
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
        let _ = self.mesh_pod_with(pod, sa, claimed_ip, &[]);
    }

    /// [`Node::mesh_pod`], with more variables for `init` and the proxy (what an annotation
    /// would give them); returns what `init` printed.
    pub fn mesh_pod_with(
        &mut self,
        pod: &Pod,
        sa: &str,
        claimed_ip: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> String {
        let init = netns::command(&pod.netns, None, &self.bins.proxy)
            .arg("init")
            .envs(extra_env.iter().copied())
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
        let ca_addr = if pod.ip.contains(':') {
            format!("[fd00:77:{}::1]:15012", self.net)
        } else {
            format!("{}:15012", self.node_ip())
        };
        cmd.arg("run")
            .env("PALISADE_CA_ADDR", ca_addr)
            .env("PALISADE_CA_NAME", "palisade-ca.palisade-system.svc")
            .env("PALISADE_TRUST_ANCHORS", self.trust_bundle_file())
            .env("PALISADE_TOKEN_FILE", token)
            .env("PALISADE_NAMESPACE", NAMESPACE)
            .env("PALISADE_SERVICE_ACCOUNT", sa)
            .env("PALISADE_POD_NAME", format!("{}-0", pod.name))
            .env("PALISADE_POD_IP", claimed_ip.unwrap_or(&pod.ip))
            .env("PALISADE_LOG", &self.proxy_log)
            .env("PALISADE_LOG_FORMAT", "json")
            // A first call to a new destination waits for the control plane's answer; on a
            // loaded CI machine (debug builds, several nodes at once) the default 2 s has been
            // exceeded once. These scenarios are about what the answer does, not how fast it is.
            .env("PALISADE_DESTINATION_WAIT", "5s");
        cmd.envs(extra_env.iter().copied());
        let id = self.procs.spawn(&format!("{}-proxy", pod.name), cmd);
        self.proxies.insert(pod.name.clone(), id);
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
        String::from_utf8_lossy(&init.stderr).into_owned()
    }

    /// Serves `www/` over HTTP on `port` in `pod`: `python3 -m http.server`, as the app uid.
    pub fn serve_http(&mut self, pod: &Pod, port: u16) {
        let www = self.dir.path().join("www");
        self.spawn_http(pod, port, &www);
    }

    /// Serves `www/` on `port` bound to the pod's loopback address only, as an app does with
    /// a port it means to keep to itself (an admin or debug port).
    pub fn serve_http_on_loopback(&mut self, pod: &Pod, port: u16) {
        let www = self.dir.path().join("www");
        self.spawn_http_bound(pod, port, &www, "127.0.0.1");
    }

    /// Serves `www/` on `port` of every address of both families (`--bind ::`, one dual-stack
    /// socket), as most apps in a dual-stack cluster listen.
    pub fn serve_http_dual_stack(&mut self, pod: &Pod, port: u16) {
        let www = self.dir.path().join("www");
        self.spawn_http_bound(pod, port, &www, "::");
    }

    fn spawn_http(&mut self, pod: &Pod, port: u16, www: &Path) {
        self.spawn_http_bound(pod, port, www, "0.0.0.0");
    }

    fn spawn_http_bound(&mut self, pod: &Pod, port: u16, www: &Path, bind: &str) {
        let mut cmd = netns::command(&pod.netns, Some(APP_UID), APP_PY);
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", bind])
            .arg("--directory")
            .arg(www);
        self.procs.spawn(&format!("{}-app-{port}", pod.name), cmd);
        let url = format!("http://127.0.0.1:{port}/");
        wait_for(
            &format!("the app of {} on port {port}", pod.name),
            Duration::from_secs(15),
            || netns::curl(&pod.netns, None, &["-sf", "--max-time", "1", &url]).is_ok(),
        );
    }

    /// A UDP echo server on `port` in `pod` (the app uid), or in the node's namespace when `pod`
    /// is `None`: it sends every datagram back to its sender.
    pub fn serve_udp_echo(&mut self, pod: Option<&Pod>, port: u16) {
        let (netns, uid, what) = match pod {
            Some(p) => (
                p.netns.clone(),
                Some(APP_UID),
                format!("{}-udp-{port}", p.name),
            ),
            None => (self.node_ns.clone(), None, format!("node-udp-{port}")),
        };
        let mut cmd = netns::command(&netns, uid, APP_PY);
        cmd.args([
            "-c",
            &format!(
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('0.0.0.0', {port}))\nwhile True:\n    data, peer = s.recvfrom(2048)\n    \
                 s.sendto(data, peer)\n"
            ),
        ]);
        self.procs.spawn(&what, cmd);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Sends one UDP datagram from `from` to `to` and returns the answer, or `None` when none
    /// came back within a second.
    pub fn udp_ask(&self, from: &Pod, to: &str) -> Option<String> {
        let script = format!(
            "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(1.0)\nhost, port = '{to}'.rsplit(':', 1)\n\
             s.sendto(b'ping', (host, int(port)))\ntry:\n    print(s.recvfrom(2048)[0].decode())\n\
             except socket.timeout:\n    sys.exit(3)\n"
        );
        let out = netns::command(&from.netns, Some(APP_UID), APP_PY)
            .args(["-c", &script])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Kills the proxy of `pod` (SIGKILL), as a crash would. Its capture rules stay: what
    /// reaches the pod is redirected to a port where nothing listens any more.
    pub fn kill_proxy(&mut self, pod: &Pod) {
        let id = self.proxies[&pod.name];
        self.procs.kill(id);
    }

    /// Serves HTTP on `port` in `pod` like [`Node::serve_http`], from a directory of its own
    /// that also holds `who` (the pod's name), so a caller can tell replicas apart.
    pub fn serve_replica(&mut self, pod: &Pod, port: u16) {
        let www = self.dir.path().join(format!("www-{}", pod.name));
        fs::create_dir_all(&www).unwrap();
        fs::set_permissions(&www, fs::Permissions::from_mode(0o755)).unwrap();
        for entry in fs::read_dir(self.dir.path().join("www")).unwrap() {
            let from = entry.unwrap().path();
            fs::copy(&from, www.join(from.file_name().unwrap())).unwrap();
        }
        let who = www.join("who");
        fs::write(&who, &pod.name).unwrap();
        fs::set_permissions(&who, fs::Permissions::from_mode(0o644)).unwrap();
        self.spawn_http(pod, port, &www);
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

    /// The sum of every series of `metric` whose labels contain all of `labels` (each
    /// written `name="value"`), whatever their order.
    pub fn metric_sum(&self, pod: &Pod, metric: &str, labels: &[&str]) -> f64 {
        self.admin(pod, "/metrics")
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            })
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
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
