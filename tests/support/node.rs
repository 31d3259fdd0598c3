//! A "node" for whole-system tests: a bridge in a network namespace of its own, "pods" that are
//! network namespaces joined to it by veth pairs, the CA on the node, and in each meshed pod
//! `palisade-proxy init` then `palisade-proxy run` as uid 1337 next to an unmodified app that
//! runs as another uid — the way a cluster runs them.
//!
//! Everything a node creates (namespaces, links, processes, files) is removed when it is
//! dropped, also when the test fails; [`Node::finish`] checks that nothing was left behind.
//! Needs root; [`skip_reason`] says why a test cannot run elsewhere.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uid the proxy runs as (its traffic is never captured).
pub const PROXY_UID: u32 = 1337;
/// The uid apps run as: anything but root and the proxy.
pub const APP_UID: u32 = 1000;
/// The namespace every workload of these tests lives in.
pub const NAMESPACE: &str = "shop";
const APP_PY: &str = "/usr/bin/python3";

/// Why the network-namespace tests cannot run here, or `None` when they can.
pub fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip", "iptables", "curl", "setpriv", "tcpdump", APP_PY] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/test.sh installs it)"
            ));
        }
    }
    None
}

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

struct Proc {
    what: String,
    child: Child,
}

/// One node: see the module documentation.
pub struct Node {
    tag: String,
    net: u8,
    bridge_ns: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    ca: Option<usize>,
    ca_ttl: String,
    pub dir: tempfile::TempDir,
    pub bins: Bins,
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
        let mut node = Node {
            bridge_ns: format!("pal{tag}-node"),
            tag,
            net,
            namespaces: Vec::new(),
            procs: Vec::new(),
            ca: None,
            ca_ttl: "1h".into(),
            dir,
            bins: Bins::locate(),
        };
        let br = node.bridge_ns.clone();
        node.add_netns(&br);
        node.ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        node.ip(&[
            "-n",
            &br,
            "addr",
            "add",
            &format!("10.77.{net}.1/24"),
            "dev",
            "br0",
        ]);
        node.ip(&["-n", &br, "link", "set", "br0", "up"]);
        node.ip(&["-n", &br, "link", "set", "lo", "up"]);
        node
    }

    /// The node's own address (where the CA listens).
    pub fn node_ip(&self) -> String {
        format!("10.77.{}.1", self.net)
    }

    /// The address a pod with host number `host` gets.
    pub fn pod_ip(&self, host: u8) -> String {
        format!("10.77.{}.{host}", self.net)
    }

    fn add_netns(&mut self, name: &str) {
        self.ip(&["netns", "add", name]);
        self.namespaces.push(name.to_owned());
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A pod named `name` at host number `host`, joined to the bridge by a veth pair.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Pod {
        let netns = format!("pal{}-{name}", self.tag);
        self.add_netns(&netns);
        let (inner, outer) = (
            format!("v{}h{host}a", self.tag),
            format!("v{}h{host}b", self.tag),
        );
        let br = self.bridge_ns.clone();
        let ip = self.pod_ip(host);
        self.ip(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer,
        ]);
        self.ip(&["link", "set", &inner, "netns", &netns]);
        self.ip(&["link", "set", &outer, "netns", &br]);
        self.ip(&["-n", &netns, "link", "set", &inner, "name", "eth0"]);
        self.ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        self.ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        self.ip(&["-n", &netns, "link", "set", "lo", "up"]);
        self.ip(&["-n", &br, "link", "set", &outer, "master", "br0"]);
        self.ip(&["-n", &br, "link", "set", &outer, "up"]);
        Pod {
            name: name.to_owned(),
            netns,
            ip,
        }
    }

    /// A command run inside `netns` as `uid` (root when `None`).
    fn in_netns(&self, netns: &str, uid: Option<u32>, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]);
        if let Some(uid) = uid {
            c.args([
                "setpriv",
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ]);
        }
        c.arg(program);
        c.env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        c
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    /// Starts a long-running process whose output goes to `<what>.log`; it is stopped with
    /// the node.
    fn spawn(&mut self, what: &str, mut cmd: Command) -> usize {
        let log = fs::File::create(self.log_path(what)).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        self.procs.push(Proc {
            what: what.to_owned(),
            child,
        });
        self.procs.len() - 1
    }

    /// The log of a process started by this node.
    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.log_path(what)).unwrap_or_default()
    }

    fn mesh_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// Writes the mesh file the way an editor or a config tool does: a new file renamed over
    /// the old one.
    pub fn write_mesh(&self, yaml: &str) {
        let tmp = self.dir.path().join("mesh.yaml.new");
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.mesh_path()).unwrap();
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts (or restarts, with the same state directory) the CA on the node, file source
    /// and local tokens, certificates of lifetime `ttl`; waits until it is ready.
    pub fn start_ca(&mut self, ttl: &str) {
        assert!(self.ca.is_none(), "the CA is already running");
        self.ca_ttl = ttl.to_owned();
        let ip = self.node_ip();
        let mut cmd = self.in_netns(&self.bridge_ns, None, &self.bins.ca.clone());
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
        self.ca = Some(self.spawn("ca", cmd));
        let url = format!("http://{ip}:15014/ready");
        let ns = self.bridge_ns.clone();
        wait_for(
            &format!("the CA to be ready ({url})"),
            Duration::from_secs(30),
            || {
                self.curl_in(&ns, None, &["-sf", "--max-time", "1", &url])
                    .is_ok()
            },
        );
        let bundle = self.trust_bundle_file();
        if !bundle.exists() {
            let out = self.run(
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
        let i = self.ca.take().expect("the CA is running");
        let p = &mut self.procs[i];
        terminate(&mut p.child);
        // Keep its log: a restart appends to a new file name.
        let old = self.log_path("ca");
        let _ = fs::rename(&old, self.log_path(&format!("ca-stopped-{i}")));
    }

    /// The trust bundle the pods were started with (the root at first start).
    pub fn trust_bundle_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The trust bundle the running CA serves on `GET /v1/trust-bundle`.
    pub fn served_trust_bundle(&self) -> String {
        let ip = self.node_ip();
        self.curl_in(
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

    fn run(&self, cmd: &mut Command) -> Output {
        let out = cmd.output().expect("run command");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A service-account token for `sa`, readable by the proxy's uid only.
    fn token(&self, sa: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{sa}.token"));
        let out = self.run(
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
        self.run(Command::new("chown").arg(PROXY_UID.to_string()).arg(&path));
        path
    }

    /// Meshes `pod` as service account `sa`: `palisade-proxy init`, then `palisade-proxy run`
    /// as uid 1337; waits until the proxy is ready. `claimed_ip` is the pod IP the proxy tells
    /// the control plane (normally the pod's own).
    pub fn mesh_pod(&mut self, pod: &Pod, sa: &str, claimed_ip: Option<&str>) {
        let init = self
            .in_netns(&pod.netns, None, &self.bins.proxy.clone())
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
        let mut cmd = self.in_netns(&pod.netns, Some(PROXY_UID), &self.bins.proxy.clone());
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
        self.spawn(&format!("{}-proxy", pod.name), cmd);
        let wait = self
            .in_netns(&pod.netns, None, &self.bins.proxy.clone())
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
        let mut cmd = self.in_netns(&pod.netns, Some(APP_UID), Path::new(APP_PY));
        cmd.args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"])
            .arg("--directory")
            .arg(&www);
        self.spawn(&format!("{}-app-{port}", pod.name), cmd);
        let url = format!("http://127.0.0.1:{port}/");
        let ns = pod.netns.clone();
        wait_for(
            &format!("the app of {} on port {port}", pod.name),
            Duration::from_secs(15),
            || {
                self.curl_in(&ns, None, &["-sf", "--max-time", "1", &url])
                    .is_ok()
            },
        );
    }

    /// Writes a file the apps serve.
    pub fn publish(&self, name: &str, body: &str) {
        let p = self.dir.path().join("www").join(name);
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn curl_in(&self, netns: &str, uid: Option<u32>, args: &[&str]) -> Result<String, String> {
        let out = self
            .in_netns(netns, uid, Path::new("curl"))
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl exit {}: {}",
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The app in `pod` (as the app uid, so its traffic is captured) fetches `url`.
    pub fn app_get(&self, pod: &Pod, url: &str) -> Result<String, String> {
        self.curl_in(
            &pod.netns,
            Some(APP_UID),
            &["-sS", "-f", "--max-time", "5", url],
        )
    }

    /// A path of the proxy's admin listener in `pod`.
    pub fn admin(&self, pod: &Pod, path: &str) -> String {
        self.curl_in(
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
        let mut cmd = self.in_netns(&pod.netns, None, Path::new("tcpdump"));
        cmd.args(["-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(["tcp", "port", &port.to_string()]);
        let index = self.spawn(&what, cmd);
        wait_for("tcpdump to listen", Duration::from_secs(10), || {
            self.log(&what).contains("listening on")
        });
        Capture { index, file }
    }

    /// Stops a capture and returns the captured bytes (pcap).
    pub fn finish_capture(&mut self, c: Capture) -> Vec<u8> {
        // tcpdump writes each packet as it comes (-U); give the last ones a moment.
        std::thread::sleep(Duration::from_millis(300));
        terminate(&mut self.procs[c.index].child);
        fs::read(&c.file).unwrap_or_default()
    }

    /// Stops everything and checks that no namespace or process of this node is left.
    pub fn finish(mut self) {
        self.teardown();
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let left: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("pal{}-", self.tag)))
            .map(str::to_owned)
            .collect();
        assert!(left.is_empty(), "network namespaces left behind: {left:?}");
        for p in &mut self.procs {
            assert!(
                p.child.try_wait().ok().flatten().is_some(),
                "{} still running",
                p.what
            );
        }
    }

    fn teardown(&mut self) {
        for p in &mut self.procs {
            terminate(&mut p.child);
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }

    /// Prints the tail of every log (after a failure).
    fn dump_logs(&self) {
        let Ok(entries) = fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            eprintln!("--- {} (last lines)", p.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.teardown();
    }
}

/// A running packet capture.
pub struct Capture {
    index: usize,
    file: PathBuf,
}

/// SIGTERM, then SIGKILL after 3 s; always reaps the child.
fn terminate(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .output();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `needle` occurs in `haystack` (packet captures are bytes).
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
