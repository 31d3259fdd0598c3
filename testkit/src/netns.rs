//! Network namespaces for tests that run real binaries, iptables included, as root: creating
//! them, joining them with veth pairs or a bridge, running commands inside, and removing
//! everything on drop, also when the test fails.

use std::path::Path;
use std::process::{Command, Output};

/// What a process run in a namespace finds on its `PATH` (its environment is cleared).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why tests needing root, network namespaces and `tools` cannot run here, or `None` when
/// they can.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip"].iter().chain(tools) {
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

/// Whether `test` has to be skipped; prints `SKIPPED <test>: <reason>` when it does, so a
/// run that exercised nothing says so.
pub fn skip(test: &str, tools: &[&str]) -> bool {
    match skip_reason(tools) {
        Some(reason) => {
            println!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Runs `ip args`; panics with its error output when it fails.
pub fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// Runs `cmd`; panics with its error output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `program` run inside `netns`, as `uid` (and its group) when given, else as root, with a
/// cleared environment.
pub fn command(netns: &str, uid: Option<u32>, program: impl AsRef<Path>) -> Command {
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
    c.arg(program.as_ref());
    c.env_clear().env("PATH", PATH);
    c
}

/// Runs `args` in `netns` as root; panics when it fails, else returns its output.
pub fn exec(netns: &str, args: &[&str]) -> String {
    let out = run_ok(command(netns, None, args[0]).args(&args[1..]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `curl args` in `netns` (as `uid` when given): the body, or curl's exit code and error.
pub fn curl(netns: &str, uid: Option<u32>, args: &[&str]) -> Result<String, String> {
    let out = command(netns, uid, "curl")
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

/// The network namespaces a test created; all are deleted (newest first) on drop, which
/// removes their links with them. Nothing is added to the host's own namespace.
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    pub fn new() -> Namespaces {
        Namespaces::default()
    }

    /// Creates `name` (replacing a leftover of an earlier run) with its loopback up.
    pub fn add(&mut self, name: &str) {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        self.names.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// A veth pair: `a_dev` in `a_ns` and `b_dev` in `b_ns`, both down and without address.
    pub fn veth(&self, (a_ns, a_dev): (&str, &str), (b_ns, b_dev): (&str, &str)) {
        ip(&[
            "-n", a_ns, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b_ns,
        ]);
    }

    /// Gives `dev` in `netns` the address `cidr` and brings it up.
    pub fn address(&self, netns: &str, dev: &str, cidr: &str) {
        ip(&["-n", netns, "addr", "add", cidr, "dev", dev]);
        ip(&["-n", netns, "link", "set", dev, "up"]);
    }

    /// A bridge `dev` in `netns` with the address `cidr`, up. Its MAC address is set, not
    /// inherited: a bridge without one takes the lowest MAC of its ports, so attaching a pod
    /// could change the MAC behind the node's address while other pods still have the old one
    /// in their ARP cache — their packets to the node (the CA) would be dropped until the
    /// entry expires.
    pub fn bridge(&self, netns: &str, dev: &str, cidr: &str) {
        ip(&[
            "-n",
            netns,
            "link",
            "add",
            dev,
            "address",
            "02:00:5e:77:00:01",
            "type",
            "bridge",
        ]);
        self.address(netns, dev, cidr);
    }

    /// Puts `port` (in the bridge's namespace) on `bridge` and brings it up.
    pub fn attach(&self, netns: &str, bridge: &str, port: &str) {
        ip(&["-n", netns, "link", "set", port, "master", bridge]);
        ip(&["-n", netns, "link", "set", port, "up"]);
    }

    /// Deletes every namespace now.
    pub fn remove_all(&mut self) {
        for ns in self.names.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// The namespaces on this machine whose names start with `prefix`: what a test left behind.
pub fn existing(prefix: &str) -> Vec<String> {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
