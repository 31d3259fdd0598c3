//! CA renewal storm: 20,000 distinct proxies ask for a certificate at the same instant, each on
//! its own HTTPS connection (TLS 1.3, HTTP/2), and retry as the proxy does until served. Prints
//! one summary block: served and failed, wall time, certificates/s, latency from the release
//! (p50, p99, p99.9, max: a starved caller shows at the tail), retries and why, the CA's CPU per
//! certificate, and the share of the crypto ceiling the CA reaches.
//!
//! `cargo bench -p palisade --bench issue_storm`; isolated: the built
//! `target/release/deps/issue_storm-* --bench` under `chrt -f 10`. Without `--bench` (as under
//! `cargo test --benches`) it makes a storm of 200.
//!
//! The CA runs in a process of its own (this binary again, `ca_child`), with every limit at
//! its default; the load client is this process, one tokio runtime with as many workers as
//! cores, on the same cores. Every key, CSR and token is made before the release; the client
//! then only connects, handshakes (verifying the CA's chain, as the proxy does), sends the
//! ready request and parses the answer.

mod ca_child;
mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy::{Outcome, Proxy, Target};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// Descriptors the client keeps for itself (runtime, stdio, the CA's pipes) out of its limit.
const RESERVED_DESCRIPTORS: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == ca_child::CHILD_FLAG) {
        ca_child::run(std::path::Path::new(&args[i + 1]));
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let (count, bound) = if full {
        (20_000, Duration::from_secs(180))
    } else {
        (200, Duration::from_secs(60))
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    palisade_ca_api::tls::install_default_provider();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), "workloads: []\n").unwrap();
    let mut ca = Command::new(std::env::current_exe().unwrap())
        .arg(ca_child::CHILD_FLAG)
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(ca.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready = ca_child::Ready::parse(&line)
        .unwrap_or_else(|| panic!("the CA process did not start: {line:?}"));
    let ceiling = &ready.ceiling;

    let issuer =
        palisade_ca::auth::local::LocalIssuer::load_or_create(&dir.path().join("state")).unwrap();
    let made = std::time::Instant::now();
    let proxies: Arc<Vec<Proxy>> = Arc::new((0..count).map(|n| Proxy::make(n, &issuer)).collect());
    let made = made.elapsed();
    let roots = std::fs::read_to_string(dir.path().join("state/root.pem")).unwrap();
    let roots = palisade_ca_api::cert::parse_pem_certs(&roots).unwrap();
    let roots = Arc::new(palisade_ca_api::tls::root_store(&roots).unwrap());
    let mut tls =
        rustls::ClientConfig::builder_with_provider(palisade_ca_api::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    // Each proxy connects for the first time: no session to resume, a full handshake each.
    tls.resumption = rustls::client::Resumption::disabled();
    let descriptors = open_files_limit().saturating_sub(RESERVED_DESCRIPTORS);
    let target = Arc::new(Target {
        addr: ready.api_addr.parse().unwrap(),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        descriptors: Arc::new(Semaphore::new(descriptors)),
    });

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("load-client")
        .enable_all()
        .build()
        .unwrap();
    let ca_before = cpu_of(&format!("/proc/{}/stat", ca.id()));
    let client_before = cpu_of("/proc/self/stat");
    let (outcomes, wall) = client_rt.block_on(storm(proxies.clone(), target, bound));
    let ca_cpu = cpu_of(&format!("/proc/{}/stat", ca.id())).saturating_sub(ca_before);
    let client_cpu = cpu_of("/proc/self/stat").saturating_sub(client_before);
    let metrics = scrape(&ready.admin_addr);

    let served = outcomes.iter().filter(|o| o.latency.is_some()).count();
    let failed = count - served;
    let mut latencies: Vec<Duration> = outcomes.iter().filter_map(|o| o.latency).collect();
    latencies.sort();
    let still_open = outcomes
        .iter()
        .filter_map(|o| o.kept.as_ref())
        .filter(|k| !k.is_closed())
        .count();
    let retries: usize = outcomes.iter().map(|o| o.failures.len()).sum();
    let retried = outcomes.iter().filter(|o| !o.failures.is_empty()).count();
    let mut causes: Vec<(&str, usize)> = Vec::new();
    for why in outcomes.iter().flat_map(|o| o.failures.iter()) {
        match causes.iter_mut().find(|(w, _)| w == why) {
            Some((_, n)) => *n += 1,
            None => causes.push((why, 1)),
        }
    }
    drop(outcomes);
    drop(client_rt);
    let audited = stop(ca, &dir.path().join("audit.jsonl"));

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rate = served as f64 / wall.as_secs_f64();
    let ca_us = ca_cpu.as_secs_f64() * 1e6 / served.max(1) as f64;
    let client_us = client_cpu.as_secs_f64() * 1e6 / served.max(1) as f64;
    let crypto_us = ceiling.total_us();
    let ceiling_rate = cores as f64 * 1e6 / crypto_us;
    let efficiency = 100.0 * crypto_us / ca_us.max(1.0);
    let causes = if causes.is_empty() {
        "none".to_owned()
    } else {
        causes
            .iter()
            .map(|(w, n)| format!("{w} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("palisade-ca renewal storm");
    println!(
        "  setup:       {count} distinct proxies (own key, CSR, token and source address in 127.0.0.0/8, made in {:.1} s before the release), released at once, each on its own HTTPS connection (TLS 1.3, full handshake, HTTP/2); the CA in its own process with every limit at its default, {cores} runtime workers; the load client ({cores} workers, at most {descriptors} descriptors) on the same {cores} cores",
        made.as_secs_f64()
    );
    println!(
        "  served:      {served} of {count}, {failed} failed (bound {:.0} s), in {:.2} s: {rate:.0} certificates/s",
        bound.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "  latency:     p50 {:.0} ms  p99 {:.0} ms  p99.9 {:.0} ms  max {:.0} ms  (from the release to the certificate in hand)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 0.999)),
        ms(latencies.last().copied().unwrap_or_default()),
    );
    println!("  retries:     {retries} by {retried} proxies ({causes})");
    println!(
        "  kept:        {still_open} of the served proxies' connections still open at the end (a proxy keeps its connection to the CA pooled)"
    );
    println!("  CA bounds:   {metrics}");
    println!(
        "  crypto/cert: token {:.0} + CSR {:.0} + signing {:.0} + TLS server side (X25519 {:.0} + P-256 signature {:.0}) = {crypto_us:.0} µs on one core",
        ceiling.token_us,
        ceiling.csr_us,
        ceiling.sign_us,
        ceiling.ecdhe_us,
        ceiling.handshake_sign_us
    );
    println!(
        "  CPU/cert:    CA {ca_us:.0} µs, load client {client_us:.0} µs (the CA process and this one, from /proc, release to last certificate)"
    );
    println!(
        "  ceiling:     CA efficiency = crypto/cert ÷ CA CPU/cert = {crypto_us:.0} ÷ {ca_us:.0} = {efficiency:.0}% of the crypto ceiling (target ≥ 85%); naive: {rate:.0}/s ÷ ({cores} cores ÷ {crypto_us:.0} µs = {ceiling_rate:.0}/s) = {:.0}%, the load client sharing the cores",
        100.0 * rate / ceiling_rate
    );
    println!(
        "  audit:       {audited} lines for {served} certificates received ({} issued to proxies that had given up waiting: work the CA did for nothing)",
        audited.saturating_sub(served)
    );
    assert_eq!(failed, 0, "proxies without a certificate");
    assert!(
        audited >= served,
        "a certificate received has no audit line"
    );
}

/// Spawns every proxy, waits until each is parked at the barrier, releases them together, and
/// returns each one's outcome and the time from the release to the last certificate.
async fn storm(
    proxies: Arc<Vec<Proxy>>,
    target: Arc<Target>,
    bound: Duration,
) -> (Vec<Outcome>, Duration) {
    let (release, released) = watch::channel(None::<Instant>);
    let parked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(proxies.len());
    for n in 0..proxies.len() {
        let (proxies, target, parked) = (proxies.clone(), target.clone(), parked.clone());
        let mut released = released.clone();
        tasks.push(tokio::spawn(async move {
            parked.fetch_add(1, Ordering::SeqCst);
            let at = *released.wait_for(Option::is_some).await.unwrap();
            proxy::ask(&proxies[n], &target, at.unwrap(), bound).await
        }));
    }
    while parked.load(Ordering::SeqCst) < proxies.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at = Instant::now();
    release.send(Some(at)).unwrap();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let wall = outcomes
        .iter()
        .filter_map(|o| o.latency)
        .max()
        .unwrap_or_default();
    (outcomes, wall)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// User and system CPU time of a process (all its threads, exited ones included).
fn cpu_of(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(10) * ticks as u32
}

/// The soft limit on open files, from /proc (getrlimit would need unsafe code).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// The CA's connection counters that are not zero, from its admin port.
fn scrape(admin: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(admin).unwrap();
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let found: Vec<String> = text
        .lines()
        .filter(|l| {
            l.starts_with("palisade_ca_api_connections_refused_total")
                || l.starts_with("palisade_ca_api_connections_closed_total")
                || l.starts_with("palisade_ca_requests_refused_total")
        })
        .filter(|l| !l.ends_with(" 0"))
        .map(|l| l.trim_start_matches("palisade_ca_").to_owned())
        .collect();
    if found.is_empty() {
        "no connection refused or closed by a bound, no request refused".into()
    } else {
        found.join(", ")
    }
}

/// Ends the CA process (closing its stdin) and counts its audit lines.
fn stop(mut ca: Child, audit: &std::path::Path) -> usize {
    drop(ca.stdin.take());
    ca.wait().unwrap();
    std::fs::read_to_string(audit).unwrap().lines().count()
}
