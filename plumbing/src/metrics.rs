//! Prometheus text exposition (format 0.0.4), written once for every binary: an [`Exposition`]
//! that writes families and samples with escaped label values, a [`Histogram`] of durations and
//! a [`CounterFamily`] of labelled counters. Locks recover from poisoning: a panic elsewhere
//! never takes `/metrics` down with it.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The text of one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition {
            out: String::with_capacity(4096),
        }
    }

    /// `# HELP` and `# TYPE` of a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
        self
    }

    /// One sample line, `name{k="v",...} value`.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            self.out.push_str(&label_set(labels));
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// `k="v",...` with the values escaped as the format requires.
fn label_set(labels: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{key}=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// A histogram of durations, in seconds, over fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            if secs <= *bound {
                count.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    pub fn encode(&self, out: &mut Exposition, name: &str, help: &str) {
        out.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            out.sample(&bucket, &[("le", &bound.to_string())], count.load(Relaxed));
        }
        let count = self.count.load(Relaxed);
        out.sample(&bucket, &[("le", "+Inf")], count);
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        out.sample(&format!("{name}_sum"), &[], sum);
        out.sample(&format!("{name}_count"), &[], count);
    }
}

/// Counters keyed by their label set. Callers pass label values from closed sets (reasons,
/// directions, results), so the number of series stays bounded.
#[derive(Debug, Default)]
pub struct CounterFamily(Mutex<BTreeMap<String, u64>>);

impl CounterFamily {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, labels: &[(&str, &str)], n: u64) {
        *self.entries().entry(label_set(labels)).or_default() += n;
    }

    /// The counter of one label set (0 when never counted).
    pub fn get(&self, labels: &[(&str, &str)]) -> u64 {
        self.entries().get(&label_set(labels)).copied().unwrap_or(0)
    }

    pub fn encode(&self, out: &mut Exposition, name: &str, help: &str) {
        out.family(name, Kind::Counter, help);
        for (labels, n) in self.entries().iter() {
            let _ = writeln!(out.out, "{name}{{{labels}}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaped_labels() {
        let family = CounterFamily::default();
        family.add(&[("direction", "inbound"), ("reason", "bad\"quote\\\n")], 2);
        family.add(&[("direction", "inbound"), ("reason", "bad\"quote\\\n")], 1);
        assert_eq!(
            family.get(&[("direction", "inbound"), ("reason", "bad\"quote\\\n")]),
            3
        );
        let mut out = Exposition::new();
        family.encode(&mut out, "palisade_x_total", "X.");
        out.single("palisade_up", Kind::Gauge, "Up.", 1);
        let text = out.finish();
        assert_eq!(
            text,
            "# HELP palisade_x_total X.\n# TYPE palisade_x_total counter\n\
             palisade_x_total{direction=\"inbound\",reason=\"bad\\\"quote\\\\\\n\"} 3\n\
             # HELP palisade_up Up.\n# TYPE palisade_up gauge\npalisade_up 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = Exposition::new();
        h.encode(&mut out, "palisade_t_seconds", "T.");
        let text = out.finish();
        for line in [
            "palisade_t_seconds_bucket{le=\"0.001\"} 1",
            "palisade_t_seconds_bucket{le=\"0.01\"} 2",
            "palisade_t_seconds_bucket{le=\"0.1\"} 2",
            "palisade_t_seconds_bucket{le=\"+Inf\"} 3",
            "palisade_t_seconds_sum 1.0055",
            "palisade_t_seconds_count 3",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_poisoned_lock_does_not_take_metrics_down() {
        let family = std::sync::Arc::new(CounterFamily::default());
        let poisoner = family.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.0.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        family.add(&[("k", "v")], 1);
        let mut out = Exposition::new();
        family.encode(&mut out, "palisade_p_total", "P.");
        assert!(out.finish().contains("palisade_p_total{k=\"v\"} 1"));
    }
}
