//! Load benchmark: client proxy → mTLS → server proxy on loopback, against the same path
//! without proxies and through the HAProxy mTLS peer (/work/shared/peers/haproxy-mtls), in one
//! run. Prints req/s (keep-alive and new connection per request) with the CPU each process
//! of the path spent per request, added p50/p99 at a fixed 1,000 req/s, bulk MB/s, and
//! resident memory idle and with 1,000 open idle connections.
//!
//!     cargo bench -p palisade --bench proxy_load
//!
//! Needs root for the peer's `apt-get install` of nginx, haproxy, wrk and iperf3 (its run.sh
//! installs them when missing). Every loop is bounded in count and time; loopback only.
//! Each proxy runs as its own process (this binary re-executed with PALISADE_BENCH_ROLE), so
//! its memory and CPU can be read from /proc.
//!
//! `<binary> --bench --idle-10k` runs instead 10,000 idle connections through one pair
//! (benches/proxy_load/idle.rs).
//!
//! Run the built binary (target/release/deps/proxy_load-*) as
//! `flock /tmp/palisade-bench.lock chrt -f 10 <binary> --bench` for figures that other work
//! on the machine does not disturb.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::wire::{Destination, PortMapping, ServiceAnswer, ServiceEndpoint};
use palisade_proxy::app::{Parts, Settings, start};
use palisade_proxy::clock::Clock;
use palisade_proxy::datapath::Limits;
use palisade_proxy::identity::{CertStore, Installed};
use palisade_proxy::inbound::InboundTarget;
use palisade_proxy::mesh::{MeshConfig, MeshView};
use palisade_proxy::metrics::Metrics;
use palisade_proxy::outbound::OutboundTarget;
use palisade_proxy::tls::TrustBundle;
use palisade_testkit::pki::Authority;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const PEER: &str = "/work/shared/peers/haproxy-mtls";
/// The Service address the Service path's client calls (nothing listens there).
const SERVICE_VIP: &str = "127.0.96.10:80";

/// The control plane's answer for the Service at `vip`: every endpoint meshed as the server.
fn service_destination(vip: SocketAddr, endpoints: &[SocketAddr]) -> Destination {
    Destination {
        service: Some(ServiceAnswer {
            name: "bench/server".into(),
            ports: vec![vip.port()],
            endpoints: endpoints
                .iter()
                .map(|e| ServiceEndpoint {
                    address: e.ip(),
                    ports: vec![PortMapping {
                        port: vip.port(),
                        target_port: e.port(),
                    }],
                    meshed: true,
                    spiffe_id: Some(SERVER_ID.parse().unwrap()),
                    workload: None,
                })
                .collect(),
            total_endpoints: endpoints.len(),
        }),
        ..Destination::unmeshed(vip.ip())
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks.
    }
    if let Ok(role) = std::env::var("PALISADE_BENCH_ROLE") {
        if role == "echo" {
            idle::echo_role();
        } else {
            proxy_role(&role);
        }
        return;
    }
    palisade_ca_api::tls::install_default_provider();
    let run = if std::env::args().any(|a| a == "--idle-10k") {
        idle::run()
    } else {
        bench()
    };
    if let Err(e) = run {
        eprintln!("proxy_load: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- certificates

/// Writes ca.pem, and <name>.pem (leaf + intermediate) and <name>.key for both identities.
fn make_certs(dir: &Path) {
    let authority = Authority::new("bench");
    std::fs::write(dir.join("ca.pem"), authority.root_pem()).unwrap();
    for (name, id) in [("server", SERVER_ID), ("client", CLIENT_ID)] {
        // A day: longer than any run.
        let leaf = authority.leaf_between(id, -60, 86_400);
        std::fs::write(dir.join(format!("{name}.pem")), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), &leaf.key_pem).unwrap();
    }
}

// ---------------------------------------------------------------- proxy role (child process)

/// Runs one proxy with static certificates and a static mesh; prints its addresses; exits
/// when its stdin closes (so it never outlives the benchmark).
fn proxy_role(role: &str) {
    palisade_ca_api::tls::install_default_provider();
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap());
    // The runtime the proxy builds for PALISADE_WORKER_THREADS.
    let rt = palisade_proxy::run::runtime(
        std::env::var("BENCH_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(1),
    )
    .unwrap();
    // Both client roles (pod address, Service address) are the client identity.
    let identity = if role == "server" { "server" } else { "client" };
    rt.block_on(async move {
        let chain: Vec<CertificateDer<'static>> = palisade_ca_api::cert::parse_pem_certs(
            &std::fs::read_to_string(dir.join(format!("{identity}.pem"))).unwrap(),
        )
        .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{identity}.key"))).unwrap();
        let roots = palisade_ca_api::cert::parse_pem_certs(
            &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        )
        .unwrap();
        let store = Arc::new(CertStore::new(Clock::system()));
        store.install(Installed::from_chain(chain, key).unwrap());
        let mesh = Arc::new(MeshView::new(MeshConfig::default()));
        mesh.set_inbound(Some(palisade_ca_api::policy::InboundPolicy {
            trust_domain: "cluster.local".into(),
            workload: "bench/server".into(),
            namespace: "bench".into(),
            default_policy: palisade_ca_api::policy::DefaultPolicy::AllAuthenticated,
            policies: vec![],
        }));
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (inbound_target, outbound_target) = match role {
            "server" => (
                InboundTarget::FixedPort(
                    std::env::var("BENCH_FORWARD_PORT")
                        .unwrap()
                        .parse()
                        .unwrap(),
                ),
                OutboundTarget::Fixed(loopback),
            ),
            "service-client" => {
                // The app calls a Service address; the proxy balances over its endpoints.
                let endpoints: Vec<SocketAddr> = std::env::var("BENCH_ENDPOINTS")
                    .unwrap()
                    .split(',')
                    .map(|a| a.parse().unwrap())
                    .collect();
                let vip: SocketAddr = SERVICE_VIP.parse().unwrap();
                mesh.set_destination(service_destination(vip, &endpoints));
                (InboundTarget::FixedPort(9), OutboundTarget::Fixed(vip))
            }
            _ => {
                let dest: SocketAddr = std::env::var("BENCH_DEST").unwrap().parse().unwrap();
                mesh.set_destination(Destination::meshed(
                    dest.ip(),
                    SERVER_ID.parse().unwrap(),
                    None,
                ));
                (InboundTarget::FixedPort(9), OutboundTarget::Fixed(dest))
            }
        };
        let bound = start(
            Settings {
                inbound_listen: loopback,
                outbound_listen: loopback,
                admin_listen: loopback,
                inbound_target,
                outbound_target,
                limits: Limits {
                    max_connections: 16_384,
                    max_connections_per_source: 16_384,
                    // As the proxy reads PALISADE_TUNNELS: on unless `off`.
                    tunnels: std::env::var("PALISADE_TUNNELS").map_or(true, |v| v != "off"),
                    ..Limits::default()
                },
                drain_timeout: Duration::from_secs(1),
                probes: Default::default(),
                probe_timeout: Duration::from_secs(1),
                admin_remote_metrics: false,
                init_report: String::new(),
            },
            Parts {
                store,
                bundle: Arc::new(TrustBundle::new(roots).unwrap()),
                mesh,
                metrics: Arc::new(Metrics::new()),
                identity: None,
                mesh_watcher: None,
            },
        )
        .await
        .unwrap();
        println!("READY {} {} {}", bound.inbound, bound.outbound, bound.admin);
        std::io::stdout().flush().unwrap();
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        })
        .await;
        std::process::exit(0);
    });
}

struct ProxyProc {
    child: Child,
    inbound: SocketAddr,
    outbound: SocketAddr,
}

impl ProxyProc {
    fn spawn(dir: &Path, role: &str, env: &[(&str, String)]) -> ProxyProc {
        let mut cmd = match std::env::var("BENCH_WRAP") {
            Ok(w) if role != "echo" => {
                let mut c = Command::new(w);
                c.arg(std::env::current_exe().unwrap());
                c
            }
            _ => Command::new(std::env::current_exe().unwrap()),
        };
        cmd.env("PALISADE_BENCH_ROLE", role)
            .env("BENCH_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        while out.read_line(&mut line).unwrap() > 0 && !line.starts_with("READY") {
            line.clear();
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            parts.first(),
            Some(&"READY"),
            "proxy did not start: {line:?}"
        );
        ProxyProc {
            child,
            inbound: parts[1].parse().unwrap(),
            outbound: parts[2].parse().unwrap(),
        }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A Palisade pair in front of `target_port`, each proxy with `workers` runtime threads:
/// returns (client, server).
/// `setting` is extra environment for both proxies (a proxy switch such as
/// `PALISADE_TUNNELS`), so that a second Palisade setting is one more call.
fn pair(
    dir: &Path,
    target_port: u16,
    workers: usize,
    setting: &[(&str, String)],
) -> (ProxyProc, ProxyProc) {
    let w = ("BENCH_WORKERS", workers.to_string());
    let mut env = vec![("BENCH_FORWARD_PORT", target_port.to_string()), w.clone()];
    env.extend_from_slice(setting);
    let server = ProxyProc::spawn(dir, "server", &env);
    let mut env = vec![("BENCH_DEST", server.inbound.to_string()), w];
    env.extend_from_slice(setting);
    let client = ProxyProc::spawn(dir, "client", &env);
    (client, server)
}

/// Two server proxies in front of `target_port` and a client proxy whose app calls the
/// Service address over them: returns (client, servers).
fn service_path(dir: &Path, target_port: u16) -> (ProxyProc, [ProxyProc; 2]) {
    let w = ("BENCH_WORKERS", "1".to_string());
    let server = || {
        ProxyProc::spawn(
            dir,
            "server",
            &[("BENCH_FORWARD_PORT", target_port.to_string()), w.clone()],
        )
    };
    let servers = [server(), server()];
    let endpoints = format!("{},{}", servers[0].inbound, servers[1].inbound);
    let client = ProxyProc::spawn(
        dir,
        "service-client",
        &[("BENCH_ENDPOINTS", endpoints), w.clone()],
    );
    (client, servers)
}

mod idle;
mod lookup;
mod measure;
mod report;

use report::PathFigures;

use measure::{child_of, fixed_rate, iperf, open_idle, wrk};

fn pids_of(file: &Path) -> u32 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn bench() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let peer_dir = dir.path().join("peer");
    let started = Command::new("bash")
        .args([
            &format!("{PEER}/run.sh"),
            "start",
            peer_dir.to_str().unwrap(),
        ])
        .output()
        .map_err(|e| format!("cannot run the peer: {e}"))?;
    if !started.status.success() {
        return Err(format!(
            "the HAProxy peer did not start: {}",
            String::from_utf8_lossy(&started.stderr)
        ));
    }
    struct StopPeer(PathBuf);
    impl Drop for StopPeer {
        fn drop(&mut self) {
            let _ = Command::new("bash")
                .args([&format!("{PEER}/run.sh"), "stop", self.0.to_str().unwrap()])
                .output();
        }
    }
    let _stop = StopPeer(peer_dir.clone());
    make_certs(dir.path());
    // One runtime thread per proxy is PALISADE_WORKER_THREADS's default; the pair with two
    // each shows what the alternative costs.
    let (http_client, http_server) = pair(dir.path(), 18080, 1, &[]);
    let (two_client, two_server) = pair(dir.path(), 18080, 2, &[]);
    let (bulk_client, _bulk_server) = pair(dir.path(), 15201, 1, &[]);
    // One TLS connection per app connection, as before pooled tunnels: what pooling pays.
    let (off_client, off_server) =
        pair(dir.path(), 18080, 1, &[("PALISADE_TUNNELS", "off".into())]);
    let palisade_off = off_client.outbound.to_string();
    let (svc_client, svc_servers) = service_path(dir.path(), 18080);
    let service = svc_client.outbound.to_string();
    let palisade = http_client.outbound.to_string();
    let palisade_two = two_client.outbound.to_string();
    std::thread::sleep(Duration::from_millis(300));
    let idle = (http_client.rss_kib(), http_server.rss_kib());
    let hs_pid = pids_of(&peer_dir.join("hs.pid"));
    let hc_pid = pids_of(&peer_dir.join("hc.pid"));
    let peer_idle = (rss_kib(hc_pid), rss_kib(hs_pid));

    println!(
        "\n== palisade-proxy load benchmark (loopback, {} cores) ==",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let n = 1000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pal_conns, peer_conns) = rt.block_on(async {
        (
            open_idle(http_client.outbound, n).await,
            open_idle("127.0.0.1:18081".parse().unwrap(), n).await,
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let loaded = (http_client.rss_kib(), http_server.rss_kib());
    let peer_loaded = (rss_kib(hc_pid), rss_kib(hs_pid));
    println!(
        "\n{:<44} {:>10} {:>16} {:>14}",
        "resident memory (VmRSS)",
        "idle KiB",
        format!("{n} conns KiB"),
        "KiB per conn"
    );
    for (name, (i, l)) in [
        ("palisade client proxy", (idle.0, loaded.0)),
        ("palisade server proxy", (idle.1, loaded.1)),
        ("haproxy client", (peer_idle.0, peer_loaded.0)),
        ("haproxy server", (peer_idle.1, peer_loaded.1)),
    ] {
        println!(
            "{:<44} {:>10} {:>16} {:>14.1}",
            name,
            i,
            l,
            (l.saturating_sub(i)) as f64 / n as f64
        );
    }
    println!("(measured before the load runs)");
    let per_conn_kib = |pair: [(u64, u64); 2]| {
        pair.iter()
            .map(|(i, l)| l.saturating_sub(*i) as f64 / n as f64)
            .fold(0.0, f64::max)
    };
    let mut figures = [
        PathFigures::default(),
        PathFigures {
            idle_rss_kib: Some(peer_idle.0.max(peer_idle.1) as f64),
            kib_per_conn: Some(per_conn_kib([
                (peer_idle.0, peer_loaded.0),
                (peer_idle.1, peer_loaded.1),
            ])),
            ..PathFigures::default()
        },
        PathFigures {
            idle_rss_kib: Some(idle.0.max(idle.1) as f64),
            kib_per_conn: Some(per_conn_kib([(idle.0, loaded.0), (idle.1, loaded.1)])),
            ..PathFigures::default()
        },
    ];
    println!(
        "opened {} palisade and {} haproxy connections",
        pal_conns.len(),
        peer_conns.len()
    );
    drop(pal_conns);
    drop(peer_conns);
    let nginx = child_of(pids_of(&peer_dir.join("nginx.pid"))).unwrap_or(0);
    let pal_pids = [http_client.child.id(), http_server.child.id()];
    let two_pids = [two_client.child.id(), two_server.child.id()];
    let off_pids = [off_client.child.id(), off_server.child.id()];
    // The Service path's client proxy and both of its servers (one request uses one server).
    let svc_pids = [
        svc_client.child.id(),
        svc_servers[0].child.id(),
        svc_servers[1].child.id(),
    ];
    let hap_pids = [hc_pid, hs_pid];
    println!(
        "\n{:<54} {:>8} {:>9} {:>9} | {:>25}",
        "path (wrk -t1, 8 s)", "req/s", "p50", "p99", "CPU us/req wrk nginx proxies"
    );
    let mut ka = Vec::new();
    for (name, addr, proxies) in [
        ("direct", "127.0.0.1:18080", &[][..]),
        ("haproxy mTLS pair", "127.0.0.1:18081", &hap_pids[..]),
        ("palisade mTLS pair", palisade.as_str(), &pal_pids[..]),
        (
            "palisade mTLS pair, 2 threads each",
            palisade_two.as_str(),
            &two_pids[..],
        ),
        ("palisade Service path", service.as_str(), &svc_pids[..]),
        (
            "palisade mTLS pair, tunnels off",
            palisade_off.as_str(),
            &off_pids[..],
        ),
    ] {
        let run = wrk(addr, 50, false, nginx, proxies);
        let c = run.cpu;
        println!(
            "{:<54} {:>8.0} {:>9} {:>9} | {:>5.1} {:>5.1} {:>5.1} (user {:.1} + sys {:.1})",
            format!("{name} keep-alive -c50"),
            run.rps,
            run.p50,
            run.p99,
            c.client.0 + c.client.1,
            c.app.0 + c.app.1,
            c.proxies.0 + c.proxies.1,
            c.proxies.0,
            c.proxies.1
        );
        ka.push(run);
    }
    let mut per_conn = Vec::new();
    for (name, addr) in [
        ("direct", "127.0.0.1:18080"),
        ("haproxy mTLS pair", "127.0.0.1:18081"),
        ("palisade mTLS pair", palisade.as_str()),
        ("palisade Service path", service.as_str()),
        ("palisade mTLS pair, tunnels off", palisade_off.as_str()),
    ] {
        let run = wrk(addr, 20, true, nginx, &[]);
        println!(
            "{:<54} {:>8.0}",
            format!("{name} new connection per request -c20"),
            run.rps
        );
        per_conn.push(run.rps);
    }
    for (f, k) in figures.iter_mut().zip(0..3) {
        f.new_conn_rps = per_conn[k];
        f.keepalive_rps = ka[k].rps;
        f.path_cpu_us = ka[k].cpu.total();
        f.proxies_cpu_us = ka[k].cpu.proxies;
    }
    println!(
        "pooled tunnels on (default) / off, same run: new connection per request {:.2}x ({:.0} vs {:.0} req/s), keep-alive {:.2}x ({:.0} vs {:.0}); off/haproxy: {:.2}x and {:.2}x; proxies' user CPU per request on {:.1} us, off {:.1} us",
        per_conn[2] / per_conn[4].max(1e-9),
        per_conn[2],
        per_conn[4],
        ka[2].rps / ka[5].rps.max(1e-9),
        ka[2].rps,
        ka[5].rps,
        per_conn[4] / per_conn[1].max(1e-9),
        ka[5].rps / ka[1].rps.max(1e-9),
        ka[2].cpu.proxies.0,
        ka[5].cpu.proxies.0
    );
    println!(
        "Service path (a Service address, balanced over 2 server proxies) / pod address path (same run): keep-alive {:.1}%, new connection per request {:.1}%   (target >= 95%)",
        100.0 * ka[4].rps / ka[2].rps,
        100.0 * per_conn[3] / per_conn[2]
    );
    println!(
        "ratio proxied/direct keep-alive: palisade {:.1}% (2 threads each: {:.1}%)   haproxy {:.1}%",
        100.0 * ka[2].rps / ka[0].rps,
        100.0 * ka[3].rps / ka[0].rps,
        100.0 * ka[1].rps / ka[0].rps
    );
    // wrk, nginx and the proxies share the cores, so req/s follows CPU per request: the
    // proxied/direct ratio cannot pass direct's CPU per request over the proxied path's, and
    // the proxies' kernel time (the loopback TCP of the two extra hops) is there whatever
    // the proxy does in user space.
    let (direct, pal) = (ka[0].cpu, ka[2].cpu);
    let floor = pal.client.0 + pal.client.1 + pal.app.0 + pal.app.1 + pal.proxies.1;
    println!(
        "CPU per request: direct {:.1} us; palisade path {:.1} us, its proxies {:.1} us (user {:.1}, kernel {:.1}); \
         with the proxies' user time at zero, palisade/direct would be at most {:.0}%, palisade/haproxy {:.2}x",
        direct.total(),
        pal.total(),
        pal.proxies.0 + pal.proxies.1,
        pal.proxies.0,
        pal.proxies.1,
        100.0 * direct.total() / floor.max(1e-9),
        figures[2].keepalive_bound_rps() / ka[1].rps.max(1e-9)
    );

    let rate = 1000;
    let count = 5000;
    println!(
        "\n{:<44} {:>10} {:>10} {:>16}",
        format!("{rate} req/s on each path at once, {count} each"),
        "p50 (us)",
        "p99 (us)",
        "client late p99"
    );
    let paths: [(&str, SocketAddr); 5] = [
        ("direct", "127.0.0.1:18080".parse().unwrap()),
        ("haproxy mTLS pair", "127.0.0.1:18081".parse().unwrap()),
        ("palisade mTLS pair", http_client.outbound),
        ("palisade mTLS pair, 2 threads each", two_client.outbound),
        ("palisade Service path", svc_client.outbound),
    ];
    let addrs: Vec<SocketAddr> = paths.iter().map(|p| p.1).collect();
    let fixed = fixed_rate(&addrs, rate, count);
    for (f, k) in figures.iter_mut().zip(0..3) {
        f.p99_us = fixed[k].p99;
    }
    for ((name, _), f) in paths.iter().zip(&fixed) {
        println!(
            "{:<44} {:>10.0} {:>10.0} {:>16.0}",
            name, f.p50, f.p99, f.late_p99
        );
    }
    println!(
        "added latency: palisade p50 {:+.0} us, p99 {:+.0} us (2 threads each: p50 {:+.0} us, p99 {:+.0} us);  haproxy p50 {:+.0} us, p99 {:+.0} us",
        fixed[2].p50 - fixed[0].p50,
        fixed[2].p99 - fixed[0].p99,
        fixed[3].p50 - fixed[0].p50,
        fixed[3].p99 - fixed[0].p99,
        fixed[1].p50 - fixed[0].p50,
        fixed[1].p99 - fixed[0].p99
    );
    println!(
        "added latency via the Service address: p50 {:+.0} us, p99 {:+.0} us (pod address: p99 {:+.0} us)",
        fixed[4].p50 - fixed[0].p50,
        fixed[4].p99 - fixed[0].p99,
        fixed[2].p99 - fixed[0].p99,
    );

    println!("\n{:<44} {:>12}", "bulk (iperf3, 5 s)", "MB/s");
    for ((name, port), f) in [
        ("direct", 15201),
        ("haproxy mTLS pair", 18082),
        ("palisade mTLS pair", bulk_client.outbound.port()),
    ]
    .into_iter()
    .zip(figures.iter_mut())
    {
        let mbs = iperf(port);
        f.bulk_mbs = Some(mbs);
        println!("{:<44} {:>12.0}", name, mbs);
    }

    lookup::print();

    // The default setting (pooled tunnels on); the tunnels-off pair is the line above the
    // Service path's in the keep-alive block.
    report::print(&report::rows(&figures[0], &figures[1], &figures[2], ""));

    Ok(())
}
