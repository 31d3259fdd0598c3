//! Load benchmark: client proxy → mTLS → server proxy on loopback, against the same path
//! without proxies and through the HAProxy mTLS peer (/work/shared/peers/haproxy-mtls), in one
//! run. Prints req/s (keep-alive and new connection per request) with the CPU each process
//! of the path spent per request, added p50/p99 at a fixed 1,000 req/s, bulk MB/s, and
//! resident memory idle and with 1,000 open idle connections.
//!
//!     cargo bench -p palisade-proxy --bench proxy_load
//!
//! Needs root for the peer's `apt-get install` of nginx, haproxy, wrk and iperf3 (its run.sh
//! installs them when missing). Every loop is bounded in count and time; loopback only.
//! Each proxy runs as its own process (this binary re-executed with PALISADE_BENCH_ROLE), so
//! its memory and CPU can be read from /proc.
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

use palisade_ca_api::wire::Destination;
use palisade_proxy::app::{Parts, Settings, start};
use palisade_proxy::clock::Clock;
use palisade_proxy::datapath::Limits;
use palisade_proxy::identity::{CertStore, Installed};
use palisade_proxy::inbound::InboundTarget;
use palisade_proxy::mesh::{MeshConfig, MeshState};
use palisade_proxy::metrics::Metrics;
use palisade_proxy::outbound::OutboundTarget;
use palisade_proxy::tls::TrustBundle;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const PEER: &str = "/work/shared/peers/haproxy-mtls";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks.
    }
    if let Ok(role) = std::env::var("PALISADE_BENCH_ROLE") {
        proxy_role(&role);
        return;
    }
    palisade_ca_api::tls::install_default_provider();
    if let Err(e) = bench() {
        eprintln!("proxy_load: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- certificates

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Writes ca.pem, and <name>.pem (leaf + intermediate) and <name>.key for both identities.
fn make_certs(dir: &Path) {
    let root = CertifiedIssuer::self_signed(ca_params("bench root"), KeyPair::generate().unwrap())
        .unwrap();
    let inter = CertifiedIssuer::signed_by(
        ca_params("bench intermediate"),
        KeyPair::generate().unwrap(),
        &root,
    )
    .unwrap();
    std::fs::write(dir.join("ca.pem"), root.pem()).unwrap();
    for (name, id) in [("server", SERVER_ID), ("client", CLIENT_ID)] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &inter).unwrap();
        std::fs::write(
            dir.join(format!("{name}.pem")),
            format!("{}{}", cert.pem(), inter.pem()),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

// ---------------------------------------------------------------- proxy role (child process)

/// Runs one proxy with static certificates and a static mesh; prints its addresses; exits
/// when its stdin closes (so it never outlives the benchmark).
fn proxy_role(role: &str) {
    palisade_ca_api::tls::install_default_provider();
    let dir = PathBuf::from(std::env::var("BENCH_DIR").unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("BENCH_WORKERS")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(1),
        )
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let chain: Vec<CertificateDer<'static>> = palisade_ca_api::cert::parse_pem_certs(
            &std::fs::read_to_string(dir.join(format!("{role}.pem"))).unwrap(),
        )
        .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{role}.key"))).unwrap();
        let roots = palisade_ca_api::cert::parse_pem_certs(
            &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        )
        .unwrap();
        let store = Arc::new(CertStore::new(Clock::system()));
        store.install(Installed::from_chain(chain, key).unwrap());
        let mesh = Arc::new(MeshState::new(MeshConfig::default()));
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
            _ => {
                let dest: SocketAddr = std::env::var("BENCH_DEST").unwrap().parse().unwrap();
                mesh.set_destination(Destination {
                    address: dest.ip(),
                    meshed: true,
                    spiffe_id: Some(SERVER_ID.parse().unwrap()),
                    workload: None,
                });
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
                    ..Limits::default()
                },
                drain_timeout: Duration::from_secs(1),
                probes: Default::default(),
                probe_timeout: Duration::from_secs(1),
            },
            Parts {
                store,
                bundle: Arc::new(TrustBundle::new(roots).unwrap()),
                mesh,
                metrics: Arc::new(Metrics::new()),
                identity: None,
                mesh_source: None,
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
        let mut cmd = Command::new(std::env::current_exe().unwrap());
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
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
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
fn pair(dir: &Path, target_port: u16, workers: usize) -> (ProxyProc, ProxyProc) {
    let w = ("BENCH_WORKERS", workers.to_string());
    let server = ProxyProc::spawn(
        dir,
        "server",
        &[("BENCH_FORWARD_PORT", target_port.to_string()), w.clone()],
    );
    let client = ProxyProc::spawn(
        dir,
        "client",
        &[("BENCH_DEST", server.inbound.to_string()), w],
    );
    (client, server)
}

// ---------------------------------------------------------------- measurements

/// What one wrk run gave, and the CPU the path's processes spent on it.
struct WrkRun {
    rps: f64,
    p50: String,
    p99: String,
    /// CPU microseconds per request: wrk, the app (nginx), the proxies; user and system.
    cpu: PathCpu,
}

/// CPU seconds (user, system) spent by the load generator, the app and the proxies of a path.
#[derive(Default, Clone, Copy)]
struct PathCpu {
    client: (f64, f64),
    app: (f64, f64),
    proxies: (f64, f64),
}

impl PathCpu {
    fn total(&self) -> f64 {
        self.client.0 + self.client.1 + self.app.0 + self.app.1 + self.proxies.0 + self.proxies.1
    }
}

/// Ticks in /proc's CPU times (USER_HZ, 100 on Linux whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;

/// Fields of /proc/<pid>/stat after the command name, so `[0]` is field 3 (state).
fn stat_fields(pid: &str) -> Vec<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.to_owned()))
        .map(|s| {
            s.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// User and system CPU seconds a process (all its threads) has used so far.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let f = stat_fields(&pid.to_string());
    if f.len() < 13 {
        return (0.0, 0.0);
    }
    (f[11] as f64 / USER_HZ, f[12] as f64 / USER_HZ)
}

/// User and system CPU seconds of this process's finished, waited-for children (wrk).
fn children_cpu_secs() -> (f64, f64) {
    let f = stat_fields("self");
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    (f[13] as f64 / USER_HZ, f[14] as f64 / USER_HZ)
}

fn sum_cpu(pids: &[u32]) -> (f64, f64) {
    pids.iter()
        .map(|p| cpu_secs(*p))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn minus(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

/// The nginx worker: the child of the master whose pid nginx wrote.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (stat_fields(&pid.to_string()).get(1) == Some(&(parent as u64))).then_some(pid)
    })
}

/// One wrk run against `addr`, with the CPU used meanwhile by `app` and `proxies`.
fn wrk(addr: &str, conns: u32, close: bool, app: u32, proxies: &[u32]) -> WrkRun {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{conns}"), "-d8s", "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let before = (children_cpu_secs(), cpu_secs(app), sum_cpu(proxies));
    let out = cmd
        .arg(format!("http://{addr}/1k.txt"))
        .output()
        .expect("wrk");
    let after = (children_cpu_secs(), cpu_secs(app), sum_cpu(proxies));
    let cpu = PathCpu {
        client: minus(after.0, before.0),
        app: minus(after.1, before.1),
        proxies: minus(after.2, before.2),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("-")
            .to_owned()
    };
    let per_request = |(u, s): (f64, f64)| {
        if requests > 0.0 {
            (u * 1e6 / requests, s * 1e6 / requests)
        } else {
            (0.0, 0.0)
        }
    };
    WrkRun {
        rps,
        p50: pct("50%"),
        p99: pct("99%"),
        cpu: PathCpu {
            client: per_request(cpu.client),
            app: per_request(cpu.app),
            proxies: per_request(cpu.proxies),
        },
    }
}

/// One GET over a keep-alive connection; returns when the whole answer is in.
fn get(s: &mut std::net::TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    s.write_all(req)?;
    let mut have = 0usize;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while have < end + 4 + len {
                let n = s.read(&mut buf[have..])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                have += n;
            }
            return Ok(());
        }
    }
}

/// Latency percentiles of one path at a fixed rate, in microseconds.
struct FixedRate {
    p50: f64,
    p99: f64,
    /// How late the client itself sent, against the schedule (its own share of the above).
    late_p99: f64,
}

/// Requests sent and not counted first, so that every path starts warm.
const WARMUP: u32 = 500;

/// Requests at `rate` over one keep-alive connection, from a thread of its own with blocking
/// I/O and the OS's high-resolution sleep (an async timer's 1 ms tick would add up to 1 ms to
/// every figure). Each request has an intended send time, `phase` past the shared schedule's
/// tick, and its latency runs from that time, so a slow answer also counts against the ones
/// it delays (no coordinated omission).
fn fixed_rate_one(
    addr: SocketAddr,
    rate: u32,
    count: u32,
    start: std::time::Instant,
    phase: Duration,
) -> FixedRate {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!("GET /1k.txt HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut lat = Vec::with_capacity(count as usize);
    let mut late = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; 8192];
    for i in 0..WARMUP + count {
        let intended = start + phase + interval * i;
        if let Some(wait) = intended.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = intended.elapsed();
        get(&mut s, req.as_bytes(), &mut buf).expect("fixed-rate request");
        if i >= WARMUP {
            lat.push(intended.elapsed().as_secs_f64() * 1e6);
            late.push(sent.as_secs_f64() * 1e6);
        }
    }
    FixedRate {
        p50: percentile(&mut lat, 0.50),
        p99: percentile(&mut lat, 0.99),
        late_p99: percentile(&mut late, 0.99),
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// Every path at `rate` during the same seconds, so that all see the same machine; their
/// schedules are spread evenly over the interval, so that no two send at the same instant
/// and queue behind each other in the one nginx worker.
fn fixed_rate(addrs: &[SocketAddr], rate: u32, count: u32) -> Vec<FixedRate> {
    let start = std::time::Instant::now() + Duration::from_millis(50);
    let step = Duration::from_secs_f64(1.0 / rate as f64) / addrs.len() as u32;
    std::thread::scope(|scope| {
        let runs: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(k, a)| {
                scope.spawn(move || fixed_rate_one(*a, rate, count, start, step * k as u32))
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn iperf(port: u16) -> f64 {
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "5",
            "-O",
            "1",
            "-J",
        ])
        .output()
        .expect("iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 8.0
        / 1e6
}

/// Opens `n` connections through `addr`, each carrying one request so the whole path is set
/// up, and keeps them open.
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET /1k.txt HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        while have < 1024 {
            let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[have..])).await;
            match r {
                Ok(Ok(k)) if k > 0 => have += k,
                _ => break,
            }
        }
        conns.push(s);
    }
    conns
}

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
    let (http_client, http_server) = pair(dir.path(), 18080, 1);
    let (two_client, two_server) = pair(dir.path(), 18080, 2);
    let (bulk_client, _bulk_server) = pair(dir.path(), 15201, 1);
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
    println!(
        "targets: idle RSS <= 8192 KiB, <= 30 KiB per open idle connection (measured before the load runs)"
    );
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
    let hap_pids = [hc_pid, hs_pid];
    println!(
        "\n{:<50} {:>8} {:>9} {:>9} | {:>25}",
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
    ] {
        let run = wrk(addr, 50, false, nginx, proxies);
        let c = run.cpu;
        println!(
            "{:<50} {:>8.0} {:>9} {:>9} | {:>5.1} {:>5.1} {:>5.1} (user {:.1} + sys {:.1})",
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
    for (name, addr) in [
        ("direct", "127.0.0.1:18080"),
        ("haproxy mTLS pair", "127.0.0.1:18081"),
        ("palisade mTLS pair", palisade.as_str()),
    ] {
        let run = wrk(addr, 20, true, nginx, &[]);
        println!(
            "{:<50} {:>8.0}",
            format!("{name} new connection per request -c20"),
            run.rps
        );
    }
    println!(
        "ratio proxied/direct keep-alive: palisade {:.1}% (2 threads each: {:.1}%)   haproxy {:.1}%   (target >= 60%)",
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
         with the proxies' user time at zero, palisade/direct would be at most {:.0}%",
        direct.total(),
        pal.total(),
        pal.proxies.0 + pal.proxies.1,
        pal.proxies.0,
        pal.proxies.1,
        100.0 * direct.total() / floor.max(1e-9)
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
    let paths: [(&str, SocketAddr); 4] = [
        ("direct", "127.0.0.1:18080".parse().unwrap()),
        ("haproxy mTLS pair", "127.0.0.1:18081".parse().unwrap()),
        ("palisade mTLS pair", http_client.outbound),
        ("palisade mTLS pair, 2 threads each", two_client.outbound),
    ];
    let addrs: Vec<SocketAddr> = paths.iter().map(|p| p.1).collect();
    let fixed = fixed_rate(&addrs, rate, count);
    for ((name, _), f) in paths.iter().zip(&fixed) {
        println!(
            "{:<44} {:>10.0} {:>10.0} {:>16.0}",
            name, f.p50, f.p99, f.late_p99
        );
    }
    println!(
        "added latency: palisade p50 {:+.0} us, p99 {:+.0} us (2 threads each: p50 {:+.0} us, p99 {:+.0} us; target p99 <= +1000 us);  haproxy p50 {:+.0} us, p99 {:+.0} us",
        fixed[2].p50 - fixed[0].p50,
        fixed[2].p99 - fixed[0].p99,
        fixed[3].p50 - fixed[0].p50,
        fixed[3].p99 - fixed[0].p99,
        fixed[1].p50 - fixed[0].p50,
        fixed[1].p99 - fixed[0].p99
    );

    println!("\n{:<44} {:>12}", "bulk (iperf3, 5 s)", "MB/s");
    for (name, port) in [
        ("direct", 15201),
        ("haproxy mTLS pair", 18082),
        ("palisade mTLS pair", bulk_client.outbound.port()),
    ] {
        println!("{:<44} {:>12.0}", name, iperf(port));
    }

    Ok(())
}
