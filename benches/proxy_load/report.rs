//! The load benchmark's summary: every figure issue #17 sets a target for, direct, HAProxy
//! and each Palisade setting side by side, the ratio to HAProxy and whether the target is met.
//! Built from plain figures, so that a second Palisade setting (another proxy environment in
//! the `proxy_role` child) adds rows without touching the arithmetic.

/// What one path gave in one run; `None` where the figure does not apply (direct has no
/// proxy memory) or was not measured for it.
#[derive(Default, Clone)]
pub struct PathFigures {
    /// wrk -c20 with `Connection: close`, req/s.
    pub new_conn_rps: f64,
    /// wrk -c50 keep-alive, req/s.
    pub keepalive_rps: f64,
    /// CPU µs per keep-alive request, (user, system), of the whole path (wrk + nginx +
    /// proxies) and of the proxies alone.
    pub path_cpu_us: f64,
    pub proxies_cpu_us: (f64, f64),
    /// p99 at a fixed 1,000 req/s, µs.
    pub p99_us: f64,
    /// iperf3, one stream, MB/s.
    pub bulk_mbs: Option<f64>,
    /// The larger of the pair's two idle VmRSS, KiB.
    pub idle_rss_kib: Option<f64>,
    /// The larger of the pair's two (RSS with n idle connections − idle RSS) / n, KiB.
    pub kib_per_conn: Option<f64>,
}

impl PathFigures {
    /// Keep-alive req/s this path would reach on the same CPU were its proxies' user time
    /// zero: wrk, nginx and the proxies share the cores, so req/s follows CPU per request,
    /// and the proxies' kernel time (the loopback TCP of the two extra hops) stays whatever
    /// the proxy does in user space.
    pub fn keepalive_bound_rps(&self) -> f64 {
        let floor = self.path_cpu_us - self.proxies_cpu_us.0;
        self.keepalive_rps * self.path_cpu_us / floor.max(1e-9)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Palisade / HAProxy at least this.
    TimesHaproxyAtLeast(f64),
    /// Palisade / HAProxy at most this.
    TimesHaproxyAtMost(f64),
    /// Palisade's own figure at most this.
    AtMost(f64),
}

pub struct Row {
    pub figure: String,
    pub direct: Option<f64>,
    pub haproxy: Option<f64>,
    pub palisade: f64,
    pub target: Target,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        self.haproxy
            .filter(|h| *h != 0.0)
            .map(|h| self.palisade / h)
    }

    pub fn met(&self) -> bool {
        match self.target {
            Target::TimesHaproxyAtLeast(x) => self.ratio().is_some_and(|r| r >= x),
            // Added latency can come out negative under noise: compare the figures, not a
            // ratio whose sign flips.
            Target::TimesHaproxyAtMost(x) => self.haproxy.is_some_and(|h| self.palisade <= x * h),
            Target::AtMost(x) => self.palisade <= x,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::TimesHaproxyAtLeast(x) => format!(">= {x}x haproxy"),
            Target::TimesHaproxyAtMost(x) => format!("<= {x}x haproxy"),
            Target::AtMost(x) => format!("<= {x}"),
        }
    }
}

/// The rows for one Palisade setting, labelled `setting` ("" for the default one).
pub fn rows(
    direct: &PathFigures,
    haproxy: &PathFigures,
    pal: &PathFigures,
    setting: &str,
) -> Vec<Row> {
    let name = |f: &str| {
        if setting.is_empty() {
            f.to_owned()
        } else {
            format!("{f} [{setting}]")
        }
    };
    let mut rows = vec![
        Row {
            figure: name("new connection per request, req/s (-c20)"),
            direct: Some(direct.new_conn_rps),
            haproxy: Some(haproxy.new_conn_rps),
            palisade: pal.new_conn_rps,
            target: Target::TimesHaproxyAtLeast(4.0),
        },
        Row {
            figure: name("keep-alive, req/s (-c50)"),
            direct: Some(direct.keepalive_rps),
            haproxy: Some(haproxy.keepalive_rps),
            palisade: pal.keepalive_rps,
            target: Target::TimesHaproxyAtLeast(1.45),
        },
        Row {
            figure: name("proxies' user CPU per request, pair, us"),
            direct: None,
            haproxy: Some(haproxy.proxies_cpu_us.0),
            palisade: pal.proxies_cpu_us.0,
            target: Target::AtMost(4.0),
        },
        Row {
            figure: name("keep-alive bound, proxies' user time at 0, req/s"),
            direct: None,
            haproxy: Some(haproxy.keepalive_rps),
            palisade: pal.keepalive_bound_rps(),
            target: Target::TimesHaproxyAtLeast(1.45),
        },
        Row {
            figure: name("added p99 at 1,000 req/s, us"),
            direct: Some(0.0),
            haproxy: Some(haproxy.p99_us - direct.p99_us),
            palisade: pal.p99_us - direct.p99_us,
            target: Target::TimesHaproxyAtMost(0.5),
        },
    ];
    if let Some(bulk) = pal.bulk_mbs {
        rows.push(Row {
            figure: name("bulk, one stream, MB/s (iperf3)"),
            direct: direct.bulk_mbs,
            haproxy: haproxy.bulk_mbs,
            palisade: bulk,
            target: Target::TimesHaproxyAtLeast(1.5),
        });
    }
    if let Some(rss) = pal.idle_rss_kib {
        rows.push(Row {
            figure: name("idle RSS per proxy (larger of pair), KiB"),
            direct: None,
            haproxy: haproxy.idle_rss_kib,
            palisade: rss,
            target: Target::AtMost(4096.0),
        });
    }
    if let Some(kib) = pal.kib_per_conn {
        rows.push(Row {
            figure: name("KiB per idle connection per proxy (1,000 open)"),
            direct: None,
            haproxy: haproxy.kib_per_conn,
            palisade: kib,
            target: Target::AtMost(16.0),
        });
    }
    rows
}

pub fn print(rows: &[Row]) {
    let num = |v: Option<f64>| match v {
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    };
    println!(
        "\n== summary (issue #17's targets, this run; unisolated runs are noisy) ==\n{:<58} {:>9} {:>9} {:>9} {:>8}  {:<18} met",
        "figure", "direct", "haproxy", "palisade", "/haproxy", "target"
    );
    for r in rows {
        println!(
            "{:<58} {:>9} {:>9} {:>9} {:>8}  {:<18} {}",
            r.figure,
            num(r.direct),
            num(r.haproxy),
            num(Some(r.palisade)),
            r.ratio().map(|x| format!("{x:.2}x")).unwrap_or("-".into()),
            r.target_text(),
            if r.met() { "met" } else { "NOT MET" }
        );
    }
}
