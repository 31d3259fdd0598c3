//! Dual-stack pods, the shape a dual-stack cluster gives them: an IPv4 and an IPv6 address on
//! `eth0`, apps listening on both (`--bind ::`). Every decision the mesh makes over IPv4 it must
//! make over IPv6 — switching family must never get a caller past policy — and a pod whose IPv6
//! cannot be captured must end up with IPv6 closed, never open.
//!
//! Needs root (network namespaces, iptables, ip6tables) and the workspace's binaries; each test
//! prints why it is skipped otherwise.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use palisade_testkit::capture::contains;
use palisade_testkit::mesh_file::{MeshFile, Workload};
use palisade_testkit::netns;
use palisade_testkit::process::wait_for;
use support::node::{self, Node, Pod};

const BODY: &str = "both families say hello";
const IPV6_TOOLS: &[&str] = &["ip6tables"];

fn node(test: &str, net: u8) -> Option<Node> {
    let tools: Vec<&str> = node::TOOLS.iter().chain(IPV6_TOOLS).copied().collect();
    if netns::skip(test, &tools) {
        return None;
    }
    let n = Node::new(net);
    n.publish("hello.txt", BODY);
    Some(n)
}

/// `http://<ip>:<port>/hello.txt`, brackets for IPv6.
fn url(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}/hello.txt")
    } else {
        format!("http://{ip}:{port}/hello.txt")
    }
}

/// A dual-stack workload of namespace `shop`: both addresses, as `status.podIPs` lists them.
fn workload(node: &Node, name: &str, sa: &str, host: u8) -> Workload {
    Workload::new(name, node::NAMESPACE, sa, &node.pod_ip(host)).ip(&node.pod_ip6(host))
}

fn policy_allowing(service_accounts: &str) -> String {
    format!(
        "  - metadata: {{name: api-from-web, namespace: shop}}
    spec: {{targetSelector: {{matchLabels: {{app: api}}}}, ports: [8080], allow: [{{serviceAccounts: [{service_accounts}]}}]}}
"
    )
}

fn mesh(node: &Node, allowed: &str) -> MeshFile {
    MeshFile::new("all-authenticated")
        .add_workload(workload(node, "web", "web", 2))
        .add_workload(workload(node, "api", "api", 3))
        .add_workload(workload(node, "intruder", "intruder", 4))
        .policies(&policy_allowing(allowed))
}

fn add_dual_stack_pod(node: &mut Node, name: &str, host: u8) -> Pod {
    let pod = node.add_pod(name, host);
    node.add_ipv6(&pod, host);
    pod
}

fn deny_count(node: &Node, api: &Pod, reason: &str) -> f64 {
    node.metric(
        api,
        &format!("palisade_policy_decisions_total{{result=\"deny\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn every_decision_is_the_same_over_ipv4_and_ipv6() {
    let Some(mut node) = node("dual_stack_decisions", 75) else {
        return;
    };
    node.write_mesh(&mesh(&node, "\"shop/web\""));
    node.start_ca("1h");
    let web = add_dual_stack_pod(&mut node, "web", 2);
    let api = add_dual_stack_pod(&mut node, "api", 3);
    let intruder = add_dual_stack_pod(&mut node, "intruder", 4);
    let plain = add_dual_stack_pod(&mut node, "plain", 5);
    node.serve_http_dual_stack(&api, 8080);
    let report = node.dir.path().join("api-init-report");
    let report = report.to_str().unwrap();
    let init = node.mesh_pod_with(&api, "api", None, &[("PALISADE_INIT_REPORT", report)]);
    assert!(init.contains("IPv6: captured with ip6tables"), "{init}");
    let ready = node.admin(&api, "/ready");
    assert!(
        ready.starts_with("ready\nIPv4: captured") && ready.contains("IPv6: captured"),
        "{ready}"
    );
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&intruder, "intruder", None);
    let targets = [node.pod_ip(3), node.pod_ip6(3)];

    // The allowed call, over each family, encrypted on the wire.
    for ip in &targets {
        let capture = node.capture(&api, 8080);
        let body = node
            .app_get(&web, &url(ip, 8080))
            .unwrap_or_else(|e| panic!("web → api at {ip} is allowed: {e}"));
        assert_eq!(body.trim(), BODY);
        let pcap = node.finish_capture(capture);
        assert!(pcap.len() > 200, "the capture at {ip} saw the call");
        assert!(!contains(&pcap, BODY), "plaintext on the wire to {ip}");
    }
    let log = node.log("api-app-8080");
    assert!(
        !log.contains(&web.ip) && !log.contains(&node.pod_ip6(2)),
        "the app saw the caller's address, not the proxy's: the mesh was bypassed\n{log}"
    );

    // The denied identity and the plaintext caller, refused and counted over each family.
    for (n, ip) in targets.iter().enumerate() {
        let refused = node.app_get(&intruder, &url(ip, 8080));
        assert!(
            refused.is_err(),
            "shop/intruder reached api at {ip}: {refused:?}"
        );
        assert_eq!(
            deny_count(&node, &api, "no_rule_matched"),
            (n + 1) as f64,
            "{ip}"
        );
        let refused = node.app_get(&plain, &url(ip, 8080));
        assert!(
            refused.is_err(),
            "a plaintext caller reached api at {ip}: {refused:?}"
        );
        assert_eq!(
            deny_count(&node, &api, "plaintext_not_allowed"),
            (n + 1) as f64,
            "{ip}"
        );
    }

    // The policy edit lets shop/intruder in over both families.
    node.write_mesh(&mesh(&node, "\"shop/web\", \"shop/intruder\""));
    for ip in &targets {
        wait_for(
            &format!("the policy edit admits shop/intruder at {ip}"),
            Duration::from_secs(15),
            || node.app_get(&intruder, &url(ip, 8080)).is_ok(),
        );
    }
    node.finish();
}

/// A directory for `PATH` with every iptables tool of the machine but the IPv6 ones, and, when
/// `nat_refused`, an `ip6tables` that refuses the nat table (a node without ip6table_nat).
fn tools_without_ipv6_capture(dir: &Path, nat_refused: bool) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let real = |name: &str| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
    };
    // `ip` and `setpriv` start the pod's processes; the rest is IPv4 capture.
    let keep = [
        "ip",
        "setpriv",
        "iptables",
        "iptables-legacy",
        "iptables-nft",
        "iptables-legacy-save",
        "iptables-nft-save",
    ];
    for name in keep {
        if let Some(path) = real(name) {
            let _ = std::os::unix::fs::symlink(path, dir.join(name));
        }
    }
    if nat_refused {
        let real6 = real("ip6tables").expect("ip6tables");
        let script = format!(
            "#!/bin/sh\ncase \" $* \" in *\" nat \"*) echo \"can't initialize ip6tables table 'nat': Table does not exist\" >&2; exit 3;; esac\nexec {} \"$@\"\n",
            real6.display()
        );
        let path = dir.join("ip6tables");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.display().to_string()
}

#[test]
fn ipv6_that_cannot_be_captured_is_closed_not_open() {
    let Some(mut node) = node("ipv6_closed_when_uncapturable", 76) else {
        return;
    };
    node.write_mesh(&mesh(&node, "\"shop/web\"").add_workload(workload(&node, "off", "off", 6)));
    node.start_ca("1h");
    let web = add_dual_stack_pod(&mut node, "web", 2);
    let api = add_dual_stack_pod(&mut node, "api", 3);
    let plain = add_dual_stack_pod(&mut node, "plain", 5);
    node.serve_http_dual_stack(&api, 8080);
    node.mesh_pod(&web, "web", None);

    // No IPv6 nat table: IPv6 TCP is rejected, IPv4 is captured as always.
    let path = tools_without_ipv6_capture(&node.dir.path().join("no-nat6"), true);
    let report = node.dir.path().join("api-init-report");
    let env = [
        ("PATH", path.as_str()),
        ("PALISADE_INIT_REPORT", report.to_str().unwrap()),
    ];
    let init = node.mesh_pod_with(&api, "api", None, &env);
    assert!(init.contains("IPv6: CLOSED"), "{init}");
    let ready = node.admin(&api, "/ready");
    assert!(
        ready.contains("IPv6: CLOSED, not captured") && ready.contains("ip6table_nat"),
        "{ready}"
    );
    let v6 = url(&node.pod_ip6(3), 8080);
    for (who, pod) in [("a plaintext caller", &plain), ("a meshed caller", &web)] {
        let open = node.app_get(pod, &v6);
        assert!(
            open.is_err(),
            "{who} reached api over IPv6 that was not captured: {open:?}"
        );
    }
    let body = node
        .app_get(&web, &url(&node.pod_ip(3), 8080))
        .expect("IPv4 is still meshed");
    assert_eq!(body.trim(), BODY);
    assert!(
        !node.log("api-app-8080").contains(&node.pod_ip6(5)),
        "the plaintext caller's IPv6 request reached the app"
    );

    // No ip6tables at all: IPv6 is turned off in the pod.
    let off = add_dual_stack_pod(&mut node, "off", 6);
    let path = tools_without_ipv6_capture(&node.dir.path().join("no-ip6tables"), false);
    let init = node.mesh_pod_with(&off, "off", None, &[("PATH", &path)]);
    assert!(init.contains("IPv6: DISABLED"), "{init}");
    let addrs = netns::exec(&off.netns, &["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains(&node.pod_ip6(6)), "IPv6 left on: {addrs}");
    node.finish();
}

#[test]
fn ipv6_only_pods_are_meshed() {
    let Some(mut node) = node("ipv6_only_pods", 77) else {
        return;
    };
    let only6 = |name: &str, sa: &str, host: u8| {
        Workload::new(name, node::NAMESPACE, sa, &format!("fd00:77:77::{host}"))
    };
    node.write_mesh(
        &MeshFile::new("all-authenticated")
            .add_workload(only6("web", "web", 2))
            .add_workload(only6("api", "api", 3))
            .policies(&policy_allowing("\"shop/web\"")),
    );
    node.ca_on_both_families();
    node.start_ca("1h");
    let web = node.add_ipv6_only_pod("web", 2);
    let api = node.add_ipv6_only_pod("api", 3);
    let plain = node.add_ipv6_only_pod("plain", 5);
    node.serve_http_dual_stack(&api, 8080);
    node.mesh_pod(&web, "web", None);
    node.mesh_pod(&api, "api", None);

    let capture = node.capture(&api, 8080);
    let body = node
        .app_get(&web, &url(&api.ip, 8080))
        .expect("web → api over IPv6 only");
    assert_eq!(body.trim(), BODY);
    let pcap = node.finish_capture(capture);
    assert!(pcap.len() > 200, "the capture saw the call");
    assert!(!contains(&pcap, BODY), "plaintext on the wire");
    let refused = node.app_get(&plain, &url(&api.ip, 8080));
    assert!(
        refused.is_err(),
        "a plaintext caller reached api: {refused:?}"
    );
    assert_eq!(deny_count(&node, &api, "plaintext_not_allowed"), 1.0);
    let identity = node.admin(&web, "/identity");
    assert!(
        identity.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{identity}"
    );
    node.finish();
}
