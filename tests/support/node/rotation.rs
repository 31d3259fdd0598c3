//! What a rotation test does to a node beyond meshing pods: flags for the CA, `palisade-ca`
//! commands against its admin port, the anchors file rewritten as the kubelet rewrites a
//! ConfigMap volume, proxies paused as a suspended pod is, and the chain a pod presents as
//! `openssl s_client` sees it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use palisade_testkit::netns::{self, run_ok};

use super::{Node, Pod};

impl Node {
    /// More flags for `palisade-ca serve` at its next start.
    pub fn set_ca_args(&mut self, args: &[&str]) {
        self.ca_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// `palisade-ca <args> --admin-addr 127.0.0.1:15014`, run in the node's namespace (as
    /// `kubectl exec` into the CA's pod would).
    pub fn ca_cli(&self, args: &[&str]) -> Output {
        netns::command(&self.node_ns, None, &self.bins.ca)
            .args(args)
            .args(["--admin-addr", "127.0.0.1:15014"])
            .output()
            .unwrap()
    }

    /// The CA's state directory.
    pub fn ca_state_dir(&self) -> PathBuf {
        self.state_dir()
    }

    /// Rewrites the anchors file every proxy was started with from `palisade-ca bundle`, by
    /// rename, as the kubelet swaps a ConfigMap volume's contents.
    pub fn publish_anchors(&self) {
        let out = run_ok(
            Command::new(&self.bins.ca)
                .arg("bundle")
                .arg("--state-dir")
                .arg(self.state_dir()),
        );
        let file = self.trust_bundle_file();
        let staged = file.with_extension("new");
        fs::write(&staged, out.stdout).unwrap();
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&staged, &file).unwrap();
    }

    /// Stops (`STOP`) or continues (`CONT`) the proxy of `pod`, as a suspended pod would be.
    pub fn signal_proxy(&self, pod: &Pod, signal: &str) {
        let pid = self.procs.pid(self.proxies[&pod.name]);
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string()),
        );
    }

    /// The certificate chain `pod` presents to a TLS client on `port` (captured to its
    /// proxy), as PEM, from `openssl s_client` in the node's namespace.
    pub fn presented_chain(&self, pod: &Pod, port: u16) -> String {
        let out = netns::command(&self.node_ns, None, "openssl")
            // The mesh's ALPN: anything else is a plaintext caller to the proxy.
            .args(["s_client", "-showcerts", "-alpn", "palisade/1", "-connect"])
            .arg(format!("{}:{port}", pod.ip))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut pem = String::new();
        let mut inside = false;
        for line in text.lines() {
            inside |= line.starts_with("-----BEGIN CERTIFICATE-----");
            if inside {
                pem.push_str(line);
                pem.push('\n');
            }
            if line.starts_with("-----END CERTIFICATE-----") {
                inside = false;
            }
        }
        pem
    }

    /// Runs `args` in the node's namespace (as root); its output.
    pub fn in_node(&self, args: &[&str]) -> Output {
        netns::command(&self.node_ns, None, args[0])
            .args(&args[1..])
            .output()
            .unwrap()
    }
}

impl Node {
    /// Runs `script` (POSIX sh) in `pod` as the app's uid, logging to `<what>.log`; it runs
    /// until it exits by itself (every loop in a script is bounded).
    pub fn spawn_app_script(&mut self, pod: &Pod, what: &str, script: &str) {
        let mut cmd = netns::command(&pod.netns, Some(super::APP_UID), "/bin/sh");
        cmd.args(["-c", script]);
        self.procs.spawn(what, cmd);
    }

    /// A file the apps can see and the test can write (e.g. to tell a loop to stop).
    pub fn shared_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Node {
    /// The node's network namespace (where the CA runs).
    pub fn node_ns(&self) -> String {
        self.node_ns.clone()
    }
}
