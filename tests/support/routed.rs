//! A routed node, as Calico builds one, and kube-proxy's iptables rules for Services.
//!
//! Pods are joined to the node namespace by point-to-point veth pairs: the pod holds its
//! address as a /32 on `eth0` with a default route via the link-local gateway 169.254.1.1,
//! which the node's end answers by proxy ARP; the node holds a /32 route per pod and forwards.
//! Every packet between two pods is routed by the node, so its conntrack sees both directions
//! and a Service's DNAT is undone on the reply. The node namespace's loopback stands for the
//! node's uplink: it holds the node's own address (where the CA listens) and the routes a
//! real node's default route would cover (the gateway, the ClusterIP range).
//!
//! [`KubeProxy`] writes the `nat` and `filter` rules kube-proxy's iptables mode writes for
//! Service ports, replaced atomically with `iptables-restore --noflush` on each change.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::process::Stdio;

use palisade_testkit::netns::{self, Namespaces};

/// The pods' default gateway, answered by the node by proxy ARP (Calico's choice).
pub const GATEWAY: &str = "169.254.1.1";
/// The ClusterIP range. Only the node namespace routes it.
pub const CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

/// Sets a sysctl inside `ns`.
fn sysctl(ns: &str, setting: &str) {
    netns::exec(ns, &["sysctl", "-qw", setting]);
}

/// Makes `node_ns` a routing node with the address `node_ip` (see the module documentation).
pub fn plumb_node(node_ns: &str, node_ip: &str) {
    netns::ip(&[
        "-n",
        node_ns,
        "addr",
        "add",
        &format!("{node_ip}/32"),
        "dev",
        "lo",
    ]);
    netns::ip(&[
        "-n",
        node_ns,
        "route",
        "add",
        &format!("{GATEWAY}/32"),
        "dev",
        "lo",
    ]);
    netns::ip(&["-n", node_ns, "route", "add", CLUSTER_IP_RANGE, "dev", "lo"]);
    sysctl(node_ns, "net.ipv4.ip_forward=1");
}

/// Joins `pod_ns` to `node_ns` by a veth pair (`eth0` in the pod, `node_dev` on the node) and
/// routes `ip` to it.
pub fn plumb_pod(namespaces: &Namespaces, node_ns: &str, pod_ns: &str, node_dev: &str, ip: &str) {
    namespaces.veth((pod_ns, "eth0"), (node_ns, node_dev));
    // Answer the pod's ARP for the gateway at once (the default proxy delay is random, up
    // to 0.8 s).
    sysctl(node_ns, &format!("net.ipv4.conf.{node_dev}.proxy_arp=1"));
    sysctl(node_ns, &format!("net.ipv4.neigh.{node_dev}.proxy_delay=0"));
    netns::ip(&["-n", node_ns, "link", "set", node_dev, "up"]);
    namespaces.address(pod_ns, "eth0", &format!("{ip}/32"));
    netns::ip(&[
        "-n", pod_ns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
    ]);
    netns::ip(&[
        "-n", pod_ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
    ]);
    netns::ip(&[
        "-n",
        node_ns,
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        node_dev,
    ]);
}

/// A Service port as kube-proxy sees it: a ClusterIP and a TCP port.
type ServicePort = (String, u16);

/// kube-proxy's iptables mode in one node namespace: every Service port it was told about,
/// with its endpoints (address, target port).
pub struct KubeProxy {
    node_ns: String,
    services: BTreeMap<ServicePort, Vec<(String, u16)>>,
    /// The per-Service and per-endpoint chains written last time, deleted when no longer used.
    chains: BTreeSet<String>,
}

impl KubeProxy {
    /// Hooks `KUBE-SERVICES` into the node's `nat` PREROUTING and OUTPUT (DNAT) and its
    /// `filter` INPUT, FORWARD and OUTPUT (refusals for Services without endpoints), as
    /// kube-proxy does.
    pub fn new(node_ns: &str) -> KubeProxy {
        let kp = KubeProxy {
            node_ns: node_ns.to_owned(),
            services: BTreeMap::new(),
            chains: BTreeSet::new(),
        };
        kp.restore(
            "*nat\n:KUBE-SERVICES - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             COMMIT\n\
             *filter\n:KUBE-SERVICES - [0:0]\n\
             -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             COMMIT\n",
        );
        kp
    }

    /// Sets the endpoints of the Service port `cluster_ip:port` (none: refused) and rewrites
    /// every Service rule at once, as kube-proxy's sync does.
    pub fn install_service(&mut self, cluster_ip: &str, port: u16, endpoints: &[(&str, u16)]) {
        self.services.insert(
            (cluster_ip.to_owned(), port),
            endpoints
                .iter()
                .map(|(ip, p)| ((*ip).to_owned(), *p))
                .collect(),
        );
        let (rules, chains) = self.rules();
        self.restore(&rules);
        self.chains = chains;
    }

    /// The `iptables-restore --noflush` input for every Service, and the chains it uses.
    /// Declaring a chain flushes it; chains of the previous sync that are gone are deleted.
    fn rules(&self) -> (String, BTreeSet<String>) {
        let mut chains = BTreeSet::new();
        let mut nat_rules = String::new();
        let mut filter_rules = String::new();
        for ((cluster_ip, port), endpoints) in &self.services {
            let comment = format!("{cluster_ip}:{port}");
            if endpoints.is_empty() {
                filter_rules.push_str(&format!(
                    "-A KUBE-SERVICES -d {cluster_ip}/32 -p tcp -m tcp --dport {port} \
                     -m comment --comment \"{comment} has no endpoints\" \
                     -j REJECT --reject-with icmp-port-unreachable\n"
                ));
                continue;
            }
            let svc = chain("KUBE-SVC", &comment);
            chains.insert(svc.clone());
            nat_rules.push_str(&format!(
                "-A KUBE-SERVICES -d {cluster_ip}/32 -p tcp -m tcp --dport {port} \
                 -m comment --comment \"{comment} cluster IP\" -j {svc}\n"
            ));
            let n = endpoints.len();
            for (i, (ip, target)) in endpoints.iter().enumerate() {
                let sep = chain("KUBE-SEP", &format!("{comment}>{ip}:{target}"));
                chains.insert(sep.clone());
                // Rule i of n takes 1/(n-i) of what the rules before it left: uniform.
                let pick = if i + 1 < n {
                    format!(
                        "-m statistic --mode random --probability {:.11} ",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                nat_rules.push_str(&format!(
                    "-A {svc} -m comment --comment \"{comment} -> {ip}:{target}\" {pick}-j {sep}\n\
                     -A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{target}\n"
                ));
            }
        }
        let stale: Vec<&String> = self.chains.difference(&chains).collect();
        let mut text = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
        // Stale chains are declared (flushed) too, as kube-proxy does, so they can be deleted.
        for c in chains.iter().chain(stale.iter().copied()) {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        text.push_str(&nat_rules);
        for c in stale {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n*filter\n:KUBE-SERVICES - [0:0]\n");
        text.push_str(&filter_rules);
        text.push_str("COMMIT\n");
        (text, chains)
    }

    fn restore(&self, rules: &str) {
        let mut child = netns::command(&self.node_ns, None, "iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iptables-restore starts");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "iptables-restore in {} failed: {}\n{rules}",
            self.node_ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How many packets matched the DNAT rule of `cluster_ip:port` (the first packet of each
    /// connection kube-proxy balanced).
    pub fn dnat_packets(&self, cluster_ip: &str, port: u16) -> u64 {
        let svc = chain("KUBE-SVC", &format!("{cluster_ip}:{port}"));
        let out = netns::exec(
            &self.node_ns,
            &[
                "iptables",
                "-t",
                "nat",
                "-L",
                "KUBE-SERVICES",
                "-n",
                "-v",
                "-x",
            ],
        );
        out.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(svc.as_str()))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// The node's whole ruleset, for failure messages.
    pub fn dump(&self) -> String {
        netns::command(&self.node_ns, None, "iptables-save")
            .arg("-c")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// A chain name of at most 28 characters (iptables' limit), stable for `key`, in kube-proxy's
/// `KUBE-SVC-…` / `KUBE-SEP-…` style.
fn chain(prefix: &str, key: &str) -> String {
    // SipHash with fixed keys: the same name for the same key in every sync.
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    format!("{prefix}-{:016X}", h.finish())
}
