//! Counters and histograms of the webhook, rendered in the Prometheus text format on the admin
//! port. Every label value comes from a closed set, so the series cannot grow with input.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::decision::SkipReason;
use crate::review::{DenyReason, Verdict};

const BUCKETS: [f64; 11] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
];

#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[derive(Debug, Default)]
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
        let mut out = String::with_capacity(4096);
        let name = "palisade_injector_reviews_total";
        let _ = writeln!(
            out,
            "# HELP {name} AdmissionReviews answered, by result and reason.\n# TYPE {name} counter"
        );
        let line = |out: &mut String, result: &str, reason: &str, n: u64| {
            let _ = writeln!(out, "{name}{{result=\"{result}\",reason=\"{reason}\"}} {n}");
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
        self.patch_build.render(
            &mut out,
            "palisade_injector_patch_build_seconds",
            "Time to build and encode the JSON patch of an injected pod.",
        );
        self.review_duration.render(
            &mut out,
            "palisade_injector_review_duration_seconds",
            "Time to answer one AdmissionReview, parsing included.",
        );
        let name = "palisade_injector_tls_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} Reloads of the serving certificate after its files changed.\n\
             # TYPE {name} counter\n\
             {name}{{result=\"success\"}} {}\n{name}{{result=\"failure\"}} {}",
            self.tls_reload_ok.load(Relaxed),
            self.tls_reload_failed.load(Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
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
