//! Throughput of `POST /mutate` over real HTTPS on loopback: a started injector, a few
//! kept-alive TLS connections (as the API server holds them), each sending Pod CREATE reviews
//! back to back. Prints reviews/s and latency percentiles in the same format on every run.
//!
//!     cargo bench -p palisade-injector --bench webhook_throughput
//!
//! PALISADE_BENCH_REVIEWS (default 40000) and PALISADE_BENCH_CONNECTIONS (default 4) change
//! the load. Target on the 2-core reference machine: >= 5000 reviews/s and p99 <= 2 ms.
//! Client and server share the machine's two cores, so other processes' load shows up in the
//! tail: on a busy machine, `chrt -f 10 target/release/deps/webhook_throughput-* --bench`
//! keeps them from preempting the run (docs/injector.md, "Performance").

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use bytes::Bytes;
use std::time::{Duration, Instant};

use palisade_testkit::pki::Authority;
use support::{Client, pod_review, serve_config, serving_leaf, tls_connector, write_leaf};

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run_worker(mut client: Client, bodies: Arc<Vec<Bytes>>, count: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let body = bodies[i % bodies.len()].clone();
        let started = Instant::now();
        let (status, response) = client.post(body).await;
        latencies.push(started.elapsed());
        assert!(status.is_success(), "HTTP {status}: {response:?}");
        // patchType follows the patch, near the end: look there, not through the base64.
        let tail = &response[response.len().saturating_sub(128)..];
        assert!(
            tail.windows(9).any(|w| w == b"JSONPatch"),
            "no patch in {response:?}"
        );
    }
    latencies
}

fn main() {
    let reviews = env_number("PALISADE_BENCH_REVIEWS", 40_000);
    let connections = env_number("PALISADE_BENCH_CONNECTIONS", 4).max(1);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Authority::new("injector test");
        let mut config = serve_config(write_leaf(dir.path(), &serving_leaf(&pki)));
        config.tls_reload_interval = Duration::from_secs(2);
        let bound = palisade_injector::start(config)
            .await
            .expect("injector starts");
        let connector = tls_connector(&pki.root_der());
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            (0..64)
                .map(|i| {
                    let review = pod_review(&format!("bench-{i:04}"));
                    Bytes::from(serde_json::to_vec(&review).expect("json"))
                })
                .collect(),
        );
        let body_bytes = bodies[0].len();

        // The webhook's own CPU per review, without sockets: separates it from the transport.
        let settings = palisade_injector::RawSettings::default()
            .validate()
            .expect("default settings");
        let cpu_reviews = 20_000;
        let cpu_started = Instant::now();
        for i in 0..cpu_reviews {
            let outcome = palisade_injector::review(&bodies[i % bodies.len()], &settings);
            assert!(outcome.is_ok_and(|o| o.patch_build.is_some()));
        }
        let review_cpu_us = cpu_started.elapsed().as_secs_f64() * 1e6 / cpu_reviews as f64;

        // Warm-up: handshakes done, allocator and caches settled.
        let mut clients = Vec::new();
        for _ in 0..connections {
            let mut client = Client::connect(bound.webhook_addr, &connector).await;
            for body in bodies.iter().take(50) {
                client.post(body.clone()).await;
            }
            clients.push(client);
        }

        let per_worker = reviews.div_ceil(connections);
        let started = Instant::now();
        let workers: Vec<_> = clients
            .into_iter()
            .map(|client| tokio::spawn(run_worker(client, bodies.clone(), per_worker)))
            .collect();
        let mut latencies = Vec::with_capacity(per_worker * connections);
        for worker in workers {
            latencies.extend(worker.await.expect("worker finished"));
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let rate = latencies.len() as f64 / elapsed.as_secs_f64();
        let p99 = percentile(&latencies, 99.0);
        println!(
            "webhook_throughput: reviews={} connections={} body_bytes={} elapsed_s={:.3} \
             reviews_per_s={:.0} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3} \
             review_cpu_us={:.1}",
            latencies.len(),
            connections,
            body_bytes,
            elapsed.as_secs_f64(),
            rate,
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 90.0)),
            ms(p99),
            ms(*latencies.last().expect("at least one review")),
            review_cpu_us,
        );
        let met = rate >= 5000.0 && p99 <= Duration::from_millis(2);
        println!(
            "webhook_throughput: target >= 5000 reviews/s and p99 <= 2 ms: {}",
            if met { "met" } else { "NOT met" }
        );
        bound.shutdown().await;
    });
}
