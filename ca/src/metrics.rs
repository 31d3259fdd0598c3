//! The CA's Prometheus metrics, rendered as text on the admin port.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the issuance latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
pub struct Metrics {
    issued: Mutex<BTreeMap<&'static str, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    mesh_reloads_ok: AtomicU64,
    mesh_reloads_failed: AtomicU64,
    mesh_last_reload_ok: AtomicI64,
    watch_streams: AtomicI64,
    kube_watch_errors: Mutex<BTreeMap<&'static str, u64>>,
    intermediate_not_after: AtomicI64,
}

impl Metrics {
    pub fn new(intermediate_not_after_unix: i64) -> Self {
        let m = Metrics::default();
        m.intermediate_not_after
            .store(intermediate_not_after_unix, Ordering::Relaxed);
        m.mesh_last_reload_ok.store(1, Ordering::Relaxed);
        m
    }

    pub fn issued(&self, authenticator: &'static str, took: Duration) {
        *self
            .issued
            .lock()
            .expect("metrics lock")
            .entry(authenticator)
            .or_default() += 1;
        let secs = took.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn refused(&self, code: &'static str) {
        *self
            .refused
            .lock()
            .expect("metrics lock")
            .entry(code)
            .or_default() += 1;
    }

    pub fn mesh_reload(&self, ok: bool) {
        let counter = if ok {
            &self.mesh_reloads_ok
        } else {
            &self.mesh_reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.mesh_last_reload_ok.store(ok as i64, Ordering::Relaxed);
    }

    /// A Kubernetes watch of `kind` failed (it is retried with backoff).
    pub fn kube_watch_error(&self, kind: &'static str) {
        *self
            .kube_watch_errors
            .lock()
            .expect("metrics lock")
            .entry(kind)
            .or_default() += 1;
    }

    pub fn watch_opened(&self) {
        self.watch_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_closed(&self) {
        self.watch_streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn render(&self, now_unix: i64) -> String {
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP palisade_ca_certificates_issued_total Certificates issued, by authenticator."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_certificates_issued_total counter");
        for (auth, n) in self.issued.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "palisade_ca_certificates_issued_total{{authenticator=\"{auth}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP palisade_ca_requests_refused_total Requests refused, by error code."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_requests_refused_total counter");
        for (code, n) in self.refused.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "palisade_ca_requests_refused_total{{code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP palisade_ca_issuance_duration_seconds Time to authenticate, check and sign one request."
        );
        let _ = writeln!(
            out,
            "# TYPE palisade_ca_issuance_duration_seconds histogram"
        );
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let n = self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "palisade_ca_issuance_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "palisade_ca_issuance_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "palisade_ca_issuance_duration_seconds_sum {sum}");
        let _ = writeln!(out, "palisade_ca_issuance_duration_seconds_count {count}");
        let expiry = self.intermediate_not_after.load(Ordering::Relaxed) - now_unix;
        let _ = writeln!(
            out,
            "# HELP palisade_ca_intermediate_expiry_seconds Seconds until the issuing intermediate expires."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_intermediate_expiry_seconds gauge");
        let _ = writeln!(out, "palisade_ca_intermediate_expiry_seconds {expiry}");
        let _ = writeln!(
            out,
            "# HELP palisade_ca_mesh_reloads_total Mesh source reloads, by result."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_mesh_reloads_total counter");
        let _ = writeln!(
            out,
            "palisade_ca_mesh_reloads_total{{result=\"ok\"}} {}",
            self.mesh_reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "palisade_ca_mesh_reloads_total{{result=\"rejected\"}} {}",
            self.mesh_reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP palisade_ca_mesh_last_reload_ok 1 when the last mesh reload was accepted, 0 when the last good state is being served."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_mesh_last_reload_ok gauge");
        let _ = writeln!(
            out,
            "palisade_ca_mesh_last_reload_ok {}",
            self.mesh_last_reload_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP palisade_ca_watch_streams Open mesh watch streams."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_watch_streams gauge");
        let _ = writeln!(
            out,
            "palisade_ca_watch_streams {}",
            self.watch_streams.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP palisade_ca_kube_watch_errors_total Failed Kubernetes watches (retried with backoff; the last good state is kept), by kind."
        );
        let _ = writeln!(out, "# TYPE palisade_ca_kube_watch_errors_total counter");
        for (kind, n) in self.kube_watch_errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "palisade_ca_kube_watch_errors_total{{kind=\"{kind}\"}} {n}"
            );
        }
        out
    }
}
