//! Load run: certificates issued over real HTTPS (TLS 1.3, HTTP/2) with the `local`
//! authenticator, by concurrent clients on loopback. Prints one summary block: the per-request
//! crypto floor, certificates/s at saturation with the CPU time of the CA and of the client,
//! and latency at a fixed 1,000 certificates/s.
//!
//! `cargo bench -p palisade --bench issue_load`; isolated: the built
//! `target/release/deps/issue_load-* --bench` under `chrt -f 10`. Without `--bench` (as under
//! `cargo test`) it runs a short smoke pass.
//!
//! The CA and the load client share the machine's cores but not a runtime: the CA runs on its
//! own tokio runtime (threads named `palisade-ca*`, as many workers as cores, like the binary),
//! the client on another, so the time each side spends is counted per thread. Every token and
//! CSR is made before the timed windows; during them the client only sends ready requests over
//! kept-alive connections and parses the answers. The CA writes its audit lines to a file.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::authority::Authority;
use palisade_ca::config::ServeConfig;
use palisade_ca::csr::{check_csr, csr_der_from_pem};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::client::{CaClient, CaClientConfig};
use palisade_ca_api::wire::{CertificateRequest, TOKEN_AUDIENCE};

/// Distinct identities, each with its own token and CSR (a proxy's key and token are its own).
const IDENTITIES: usize = 2048;
const CONNECTIONS: usize = 8;
const CONCURRENCY: usize = 64;
const PACED_RATE: u32 = 1000;
/// Thread-name prefix of everything the CA runs; the rest of the process is the load client.
const CA_THREADS: &str = "palisade-ca";

type Prepared = Arc<Vec<(String, CertificateRequest)>>;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (saturate_for, paced_for) = if full {
        (Duration::from_secs(10), Duration::from_secs(10))
    } else {
        (Duration::from_millis(300), Duration::from_millis(300))
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    palisade_ca_api::tls::install_default_provider();
    let ca_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(CA_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("load-client")
        .enable_all()
        .build()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "workloads: []\n").unwrap();
    let mut config = ServeConfig::embedded(dir.path().join("state"), mesh);
    config.rate_limit_per_identity = 0;
    // A file, as a container runtime makes of stdout; and the summary stays readable.
    let audit_file = dir.path().join("audit.jsonl");
    config.audit_file = Some(audit_file.clone());
    let running = ca_rt.block_on(palisade_ca::server::start(config)).unwrap();
    let issuer = LocalIssuer::load_or_create(&dir.path().join("state")).unwrap();
    let requests: Prepared = Arc::new(
        (0..IDENTITIES)
            .map(|i| {
                let key = rcgen::KeyPair::generate().unwrap();
                let csr = palisade_testkit::pki::csr_pem(&key, vec![]);
                let token = issuer
                    .mint(
                        "load",
                        &format!("sa-{i}"),
                        Some(&format!("pod-{i}")),
                        TOKEN_AUDIENCE,
                        Duration::from_secs(3600),
                    )
                    .unwrap();
                (
                    token,
                    CertificateRequest {
                        csr,
                        ttl_seconds: None,
                    },
                )
            })
            .collect(),
    );
    let floor = crypto_floor(&issuer, &running.ca.rotation.authority(), &requests);

    let roots = Arc::new(
        palisade_ca_api::tls::root_store(running.ca.rotation.authority().roots()).unwrap(),
    );
    let clients: Vec<CaClient> = (0..CONNECTIONS)
        .map(|_| {
            CaClient::new(CaClientConfig {
                addr: running.api_addr.to_string(),
                server_name: "palisade-ca.palisade-system.svc".into(),
                roots: roots.clone(),
                client_cert: None,
                timeout: Duration::from_secs(10),
            })
            .unwrap()
        })
        .collect();
    client_rt.block_on(async {
        for c in &clients {
            c.trust_bundle().await.unwrap();
        }
    });

    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let (ok, failed) = client_rt.block_on(saturate(&clients, &requests, started + saturate_for));
    let elapsed = started.elapsed();
    let cpu = CpuTime::now().since(&cpu_before);
    let rate = ok as f64 / elapsed.as_secs_f64();

    let (mut latencies, paced_failed) = paced(&client_rt, &clients, &requests, paced_for);
    latencies.sort();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_cert = |d: Duration| d.as_secs_f64() * 1e6 / ok.max(1) as f64;
    let (ca_us, client_us) = (per_cert(cpu.ca), per_cert(cpu.rest));
    let budget_us = cores as f64 * 1e6 / 5000.0;
    println!("palisade-ca issuance benchmark");
    println!(
        "  setup:       HTTPS (TLS 1.3, HTTP/2) on loopback, local authenticator, {cores} cores shared by the CA ({cores} runtime workers) and the load client (own runtime, same process)"
    );
    println!(
        "  client:      {IDENTITIES} distinct tokens and CSRs made before the timed windows; during them it only sends them over {CONNECTIONS} kept-alive connections and parses the answers"
    );
    println!(
        "  crypto/cert: token check {:.0} µs + CSR check {:.0} µs + leaf signing {:.0} µs = {:.0} µs on one core (of which P-256 alone: 2 verifications {:.0} µs + 1 signature {:.0} µs = {:.0} µs)",
        floor.token_us,
        floor.csr_us,
        floor.sign_us,
        floor.total_us(),
        2.0 * floor.p256_verify_us,
        floor.p256_sign_us,
        floor.p256_us(),
    );
    println!(
        "  ceiling:     {cores} cores / {:.0} µs = {:.0} certificates/s for the CA's crypto alone, client and network not counted (5,000/s leaves {budget_us:.0} µs per certificate for everything)",
        floor.total_us(),
        cores as f64 * 1e6 / floor.total_us(),
    );
    println!(
        "  saturation:  {rate:>6.0} certificates/s  ({ok} issued, {failed} failed, {CONCURRENCY} concurrent, {:.1} s)",
        elapsed.as_secs_f64()
    );
    println!(
        "  CPU/cert:    CA {ca_us:.0} µs, load client {client_us:.0} µs  (the CA alone on {cores} cores: {:.0} certificates/s)",
        cores as f64 * 1e6 / ca_us.max(1.0)
    );
    println!(
        "  at {PACED_RATE}/s:     p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} issued, {paced_failed} failed, {:.0} s; latency from each request's scheduled start)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 0.999)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        paced_for.as_secs_f64(),
    );
    ca_rt.block_on(running.shutdown());
    let audited = std::fs::read_to_string(&audit_file)
        .unwrap()
        .lines()
        .count();
    let issued = ok as usize + latencies.len();
    println!("  audit:       {audited} lines for {issued} certificates issued");
    assert_eq!(
        failed + paced_failed as u64,
        0,
        "requests failed under load"
    );
    assert_eq!(audited, issued, "an issued certificate has no audit line");
}

/// As many requests as the CA answers, from `CONCURRENCY` workers, until `deadline`.
async fn saturate(clients: &[CaClient], requests: &Prepared, deadline: Instant) -> (u64, u64) {
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        let (client, requests) = (clients[w % CONNECTIONS].clone(), requests.clone());
        workers.spawn(async move {
            let (mut ok, mut failed, mut i) = (0u64, 0u64, w);
            while Instant::now() < deadline {
                let (token, req) = &requests[i % requests.len()];
                match client.request_certificate(token, req).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                i += CONCURRENCY;
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        failed += f;
    }
    (ok, failed)
}

/// Open loop at `PACED_RATE`: a thread of its own starts request n at `start + n / rate`,
/// whether or not earlier ones have been answered, and each latency counts from that scheduled
/// instant, so a stalled CA or a late client shows in the figures instead of hiding in them.
fn paced(
    client_rt: &tokio::runtime::Runtime,
    clients: &[CaClient],
    requests: &Prepared,
    paced_for: Duration,
) -> (Vec<Duration>, usize) {
    let count = (paced_for.as_secs_f64() * PACED_RATE as f64) as u32;
    let interval = Duration::from_secs(1) / PACED_RATE;
    let (tx, rx) = mpsc::channel();
    let handle = client_rt.handle().clone();
    let (clients, requests) = (clients.to_vec(), requests.clone());
    let pacer = std::thread::Builder::new()
        .name("load-pacer".into())
        .spawn(move || {
            let start = Instant::now() + Duration::from_millis(10);
            for n in 0..count {
                let scheduled = start + interval * n;
                if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (client, requests, tx) = (
                    clients[n as usize % CONNECTIONS].clone(),
                    requests.clone(),
                    tx.clone(),
                );
                handle.spawn(async move {
                    let (token, req) = &requests[n as usize % requests.len()];
                    let result = client.request_certificate(token, req).await;
                    let _ = tx.send(result.map(|_| scheduled.elapsed()));
                });
            }
        })
        .unwrap();
    pacer.join().unwrap();
    let (mut latencies, mut failed) = (Vec::with_capacity(count as usize), 0);
    for _ in 0..count {
        match rx.recv().unwrap() {
            Ok(d) => latencies.push(d),
            Err(_) => failed += 1,
        }
    }
    (latencies, failed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// One-core cost of each check the CA makes per request, and of the bare P-256 operations
/// underneath them.
struct Floor {
    token_us: f64,
    csr_us: f64,
    sign_us: f64,
    p256_verify_us: f64,
    p256_sign_us: f64,
}

impl Floor {
    fn total_us(&self) -> f64 {
        self.token_us + self.csr_us + self.sign_us
    }
    fn p256_us(&self) -> f64 {
        2.0 * self.p256_verify_us + self.p256_sign_us
    }
}

fn crypto_floor(issuer: &LocalIssuer, authority: &Authority, requests: &Prepared) -> Floor {
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    let n = requests.len();
    let ders: Vec<Vec<u8>> = requests
        .iter()
        .map(|(_, r)| csr_der_from_pem(&r.csr).unwrap())
        .collect();
    let ids: Vec<SpiffeId> = (0..n)
        .map(|i| SpiffeId::new("cluster.local", "load", &format!("sa-{i}")).unwrap())
        .collect();
    let spkis: Vec<Vec<u8>> = (0..n)
        .map(|i| check_csr(&ders[i], &ids[i]).unwrap().spki_der)
        .collect();
    let ttl = time::Duration::hours(1);
    let now = time::OffsetDateTime::now_utc();
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let message = [7u8; 300];
    let signature = key.sign(&rng, &message).unwrap();
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    Floor {
        token_us: per_call_us(|i| {
            issuer.verify(&requests[i % n].0, TOKEN_AUDIENCE).unwrap();
        }),
        csr_us: per_call_us(|i| {
            check_csr(&ders[i % n], &ids[i % n]).unwrap();
        }),
        sign_us: per_call_us(|i| {
            authority
                .issue_leaf(&spkis[i % n], &ids[i % n], ttl, now)
                .unwrap();
        }),
        p256_verify_us: per_call_us(|_| public.verify(&message, signature.as_ref()).unwrap()),
        p256_sign_us: per_call_us(|_| {
            key.sign(&rng, &message).unwrap();
        }),
    }
}

/// The least disturbed of a few timed batches, in µs per call, after a warm-up.
fn per_call_us(mut f: impl FnMut(usize)) -> f64 {
    const BATCH: usize = 200;
    (0..BATCH).for_each(&mut f);
    (0..5)
        .map(|b| {
            let t = Instant::now();
            (b * BATCH..(b + 1) * BATCH).for_each(&mut f);
            t.elapsed().as_secs_f64() * 1e6 / BATCH as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// CPU time of the CA's threads and of the rest of the process.
struct CpuTime {
    ca: Duration,
    rest: Duration,
}

impl CpuTime {
    /// From /proc: per thread by name for the CA; the whole process (threads that have exited
    /// included) minus the CA for the rest.
    fn now() -> Self {
        let ticks = |stat: &str| -> u64 {
            // Fields after the parenthesised name; utime and stime are the 12th and 13th.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let f: Vec<&str> = after.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        let mut ca = 0;
        for task in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with(CA_THREADS) {
                ca += ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
            }
        }
        let total = ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
        // USER_HZ is 100 on Linux.
        let tick = Duration::from_millis(10);
        CpuTime {
            ca: tick * ca as u32,
            rest: tick * total.saturating_sub(ca) as u32,
        }
    }

    fn since(&self, before: &CpuTime) -> CpuTime {
        CpuTime {
            ca: self.ca.saturating_sub(before.ca),
            rest: self.rest.saturating_sub(before.rest),
        }
    }
}
