//! Measuring the load benchmark's paths: wrk runs with the CPU each process of a path spent
//! (from /proc), the fixed-rate latency client, iperf3 bulk throughput, and idle connections.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one wrk run gave, and the CPU the path's processes spent on it.
pub struct WrkRun {
    pub rps: f64,
    pub p50: String,
    pub p99: String,
    /// CPU microseconds per request: wrk, the app (nginx), the proxies; user and system.
    pub cpu: PathCpu,
}

/// CPU seconds (user, system) spent by the load generator, the app and the proxies of a path.
#[derive(Default, Clone, Copy)]
pub struct PathCpu {
    pub client: (f64, f64),
    pub app: (f64, f64),
    pub proxies: (f64, f64),
}

impl PathCpu {
    pub fn total(&self) -> f64 {
        self.client.0 + self.client.1 + self.app.0 + self.app.1 + self.proxies.0 + self.proxies.1
    }
}

/// Ticks in /proc's CPU times (USER_HZ, 100 on Linux whatever the kernel's HZ).
pub const USER_HZ: f64 = 100.0;

/// Fields of /proc/<pid>/stat after the command name, so `[0]` is field 3 (state).
pub fn stat_fields(pid: &str) -> Vec<u64> {
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
pub fn cpu_secs(pid: u32) -> (f64, f64) {
    let f = stat_fields(&pid.to_string());
    if f.len() < 13 {
        return (0.0, 0.0);
    }
    (f[11] as f64 / USER_HZ, f[12] as f64 / USER_HZ)
}

/// User and system CPU seconds of this process's finished, waited-for children (wrk).
pub fn children_cpu_secs() -> (f64, f64) {
    let f = stat_fields("self");
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    (f[13] as f64 / USER_HZ, f[14] as f64 / USER_HZ)
}

pub fn sum_cpu(pids: &[u32]) -> (f64, f64) {
    pids.iter()
        .map(|p| cpu_secs(*p))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

pub fn minus(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0 - b.0, a.1 - b.1)
}

/// The nginx worker: the child of the master whose pid nginx wrote.
pub fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (stat_fields(&pid.to_string()).get(1) == Some(&(parent as u64))).then_some(pid)
    })
}

/// One wrk run against `addr`, with the CPU used meanwhile by `app` and `proxies`.
pub fn wrk(addr: &str, conns: u32, close: bool, app: u32, proxies: &[u32]) -> WrkRun {
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
pub fn get(s: &mut std::net::TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
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
pub struct FixedRate {
    pub p50: f64,
    pub p99: f64,
    /// How late the client itself sent, against the schedule (its own share of the above).
    pub late_p99: f64,
}

/// Requests sent and not counted first, so that every path starts warm.
pub const WARMUP: u32 = 500;

/// Requests at `rate` over one keep-alive connection, from a thread of its own with blocking
/// I/O and the OS's high-resolution sleep (an async timer's 1 ms tick would add up to 1 ms to
/// every figure). Each request has an intended send time, `phase` past the shared schedule's
/// tick, and its latency runs from that time, so a slow answer also counts against the ones
/// it delays (no coordinated omission).
pub fn fixed_rate_one(
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

pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// Every path at `rate` during the same seconds, so that all see the same machine; their
/// schedules are spread evenly over the interval, so that no two send at the same instant
/// and queue behind each other in the one nginx worker.
pub fn fixed_rate(addrs: &[SocketAddr], rate: u32, count: u32) -> Vec<FixedRate> {
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

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

pub fn iperf(port: u16) -> f64 {
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
pub async fn open_idle(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
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
