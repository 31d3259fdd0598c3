//! Counters and histograms of the webhook, rendered in the Prometheus text format on the admin
//! port. Every label value comes from a closed set, so the series cannot grow with input.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use palisade_plumbing::metrics::{Exposition, Histogram, Kind};

use crate::decision::SkipReason;
use crate::review::{DenyReason, Verdict};

static BUCKETS: [f64; 11] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
];

#[derive(Debug)]
pub struct Metrics {
    injected: AtomicU64,
    skipped: [AtomicU64; SkipReason::ALL.len()],
    denied: [AtomicU64; DenyReason::ALL.len()],
    /// HTTP 4xx answers by error code; codes are `&'static str` from a closed set.
    rejected: Mutex<Vec<(&'static str, u64)>>,
    pub patch_build: Histogram,
    pub review_duration: Histogram,
    tls_reload_ok: AtomicU64,
    tls_reload_failed: AtomicU64,
    /// The webhook listener's connections: open, refused over a cap.
    pub webhook_connections: std::sync::Arc<palisade_plumbing::conn_gate::ConnectionStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            injected: AtomicU64::default(),
            skipped: Default::default(),
            denied: Default::default(),
            rejected: Mutex::default(),
            patch_build: Histogram::new(&BUCKETS),
            review_duration: Histogram::new(&BUCKETS),
            tls_reload_ok: AtomicU64::default(),
            tls_reload_failed: AtomicU64::default(),
            webhook_connections: std::sync::Arc::new(
                palisade_plumbing::conn_gate::ConnectionStats::new("webhook"),
            ),
        }
    }
}

impl Metrics {
    pub fn record(&self, verdict: Verdict) {
        match verdict {
            Verdict::Injected => self.injected.fetch_add(1, Relaxed),
            Verdict::Skipped(r) => {
                let i = SkipReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
                self.skipped[i].fetch_add(1, Relaxed)
            }
            Verdict::Denied(r) => {
                let i = DenyReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
                self.denied[i].fetch_add(1, Relaxed)
            }
        };
    }

    pub fn record_rejected(&self, code: &'static str) {
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        match rejected.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => rejected.push((code, 1)),
        }
    }

    pub fn record_tls_reload(&self, ok: bool) {
        let counter = if ok {
            &self.tls_reload_ok
        } else {
            &self.tls_reload_failed
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = Exposition::new();
        let name = "palisade_injector_reviews_total";
        out.family(
            name,
            Kind::Counter,
            "AdmissionReviews answered, by result and reason.",
        );
        let line = |out: &mut Exposition, result: &str, reason: &str, n: u64| {
            out.sample(name, &[("result", result), ("reason", reason)], n);
        };
        line(
            &mut out,
            "injected",
            "injected",
            self.injected.load(Relaxed),
        );
        for (reason, n) in SkipReason::ALL.iter().zip(&self.skipped) {
            line(&mut out, "skipped", reason.as_str(), n.load(Relaxed));
        }
        for (reason, n) in DenyReason::ALL.iter().zip(&self.denied) {
            line(&mut out, "denied", reason.as_str(), n.load(Relaxed));
        }
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (code, n) in rejected {
            line(&mut out, "rejected", code, n);
        }
        self.patch_build.encode(
            &mut out,
            "palisade_injector_patch_build_seconds",
            "Time to build and encode the JSON patch of an injected pod.",
        );
        self.review_duration.encode(
            &mut out,
            "palisade_injector_review_duration_seconds",
            "Time to answer one AdmissionReview, parsing included.",
        );
        let name = "palisade_injector_tls_reloads_total";
        out.family(
            name,
            Kind::Counter,
            "Reloads of the serving certificate after its files changed.",
        )
        .sample(
            name,
            &[("result", "success")],
            self.tls_reload_ok.load(Relaxed),
        )
        .sample(
            name,
            &[("result", "failure")],
            self.tls_reload_failed.load(Relaxed),
        );
        self.webhook_connections
            .encode(&mut out, "palisade_injector_webhook");
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn counts_by_result_and_reason() {
        let m = Metrics::default();
        m.record(Verdict::Injected);
        m.record(Verdict::Skipped(SkipReason::HostNetwork));
        m.record(Verdict::Skipped(SkipReason::HostNetwork));
        m.record(Verdict::Denied(DenyReason::InvalidAnnotation));
        m.record_rejected("not_json");
        m.patch_build.observe(Duration::from_micros(30));
        let text = m.render();
        for expected in [
            "palisade_injector_reviews_total{result=\"injected\",reason=\"injected\"} 1",
            "palisade_injector_reviews_total{result=\"skipped\",reason=\"host_network\"} 2",
            "palisade_injector_reviews_total{result=\"skipped\",reason=\"opted_out\"} 0",
            "palisade_injector_reviews_total{result=\"denied\",reason=\"invalid_annotation\"} 1",
            "palisade_injector_reviews_total{result=\"rejected\",reason=\"not_json\"} 1",
            "palisade_injector_patch_build_seconds_bucket{le=\"0.000025\"} 0",
            "palisade_injector_patch_build_seconds_bucket{le=\"0.00005\"} 1",
            "palisade_injector_patch_build_seconds_count 1",
            "palisade_injector_tls_reloads_total{result=\"failure\"} 0",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
