//! Load run: certificates issued over real HTTPS (HTTP/2, TLS 1.3) by concurrent clients on
//! loopback, with the `local` authenticator. Prints certificates/s at saturation, then p50/p99
//! latency at a fixed 1,000 certificates/s. Bounded in time; `cargo bench --bench issue_load`.
//! Without `--bench` (as under `cargo test`) it runs a short smoke pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_ca::auth::local::LocalIssuer;
use palisade_ca::config::ServeConfig;
use palisade_ca_api::client::{CaClient, CaClientConfig};
use palisade_ca_api::wire::CertificateRequest;

const IDENTITIES: usize = 256;
const CONNECTIONS: usize = 8;
const CONCURRENCY: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (saturate_for, paced_for) = if full {
        (Duration::from_secs(10), Duration::from_secs(10))
    } else {
        (Duration::from_millis(300), Duration::from_millis(300))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        palisade_ca_api::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, "workloads: []\n").unwrap();
        let mut config = ServeConfig::embedded(dir.path().join("state"), mesh);
        config.rate_limit_per_identity = 0;
        let running = palisade_ca::server::start(config).await.unwrap();
        let roots = Arc::new(palisade_ca_api::tls::root_store(running.ca.authority.roots()).unwrap());
        let issuer = LocalIssuer::load_or_create(&dir.path().join("state")).unwrap();
        // Requests are made up front: the load measures the CA, not the client's key generation.
        let requests: Arc<Vec<(String, CertificateRequest)>> = Arc::new(
            (0..IDENTITIES)
                .map(|i| {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
                    let token = issuer.mint("load", &format!("sa-{i}"), None, "palisade-ca", Duration::from_secs(3600)).unwrap();
                    (token, CertificateRequest { csr, ttl_seconds: None })
                })
                .collect(),
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
        for c in &clients {
            c.trust_bundle().await.unwrap();
        }

        // Saturation: CONCURRENCY workers, as fast as the CA answers.
        let deadline = Instant::now() + saturate_for;
        let started = Instant::now();
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
        let rate = ok as f64 / started.elapsed().as_secs_f64();

        // Fixed rate: one request every millisecond, latency of each.
        let mut paced = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let end = Instant::now() + paced_for;
        let mut n = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            let (client, requests) = (clients[n % CONNECTIONS].clone(), requests.clone());
            paced.spawn(async move {
                let (token, req) = &requests[n % requests.len()];
                let t = Instant::now();
                client.request_certificate(token, req).await.map(|_| t.elapsed())
            });
            n += 1;
        }
        let mut latencies = Vec::with_capacity(n);
        let mut paced_failed = 0;
        while let Some(r) = paced.join_next().await {
            match r.unwrap() {
                Ok(d) => latencies.push(d),
                Err(_) => paced_failed += 1,
            }
        }
        latencies.sort();
        println!("palisade-ca issuance over HTTPS (HTTP/2, TLS 1.3, local authenticator, {CONNECTIONS} connections, {CONCURRENCY} concurrent, {} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
        println!("  saturation: {rate:>8.0} certificates/s  ({ok} issued, {failed} failed, {:.1} s)", saturate_for.as_secs_f64());
        println!(
            "  at 1000/s:  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} issued, {paced_failed} failed)",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.len()
        );
        assert_eq!(failed + paced_failed, 0, "requests failed under load");
        running.shutdown().await;
    });
}
