//! `proxy_load --bench --idle-10k`: 10,000 concurrent idle connections through one Palisade
//! pair, with what they cost each proxy (RSS and open fds) and what is left after they close.
//! Apart from the default run: it needs no HAProxy peer and raises RLIMIT_NOFILE.
//!
//! The app behind the server proxy is an echo server in this process (nginx's one worker
//! holds far fewer connections). Each connection sends a line and waits for its echo, so the
//! whole path (both proxies, mTLS, the app) is set up, then stays idle. Two rounds of open,
//! hold, close: growth in the first round after close can be the allocator keeping freed
//! pages; growth again in the second would be a leak.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ProxyProc, make_certs, pair};

const CONNECTIONS: usize = 10_000;
/// Connections being opened at once.
const OPENING: usize = 64;
/// Enough for the bench (a client and an app end per connection) and for each proxy (two
/// ends per connection), with room.
const NOFILE: u64 = 65_536;
const ROUNDS: usize = 2;

/// Resident memory and open files of one process.
#[derive(Clone, Copy, Default)]
struct Footprint {
    rss: u64,
    anon: u64,
    file: u64,
    /// Proportional set size: shared pages (libc, the binary's text) divided among the
    /// processes that map them, so nearer to what this process alone costs.
    pss: u64,
    threads: u64,
    fds: u64,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    Footprint {
        pss,
        threads: field("Threads:"),
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0),
    }
}

fn prlimit_nofile(limit: u64) -> bool {
    Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// This process's hard open-files limit, from /proc.
fn hard_nofile() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// Raises this process's open-files limit with prlimit(1), so that the processes started
/// afterwards inherit it (`setrlimit` itself is an unsafe call). Where the hard limit cannot
/// be raised (a container without CAP_SYS_RESOURCE), the soft one goes up to it. Returns the
/// limit now in force.
fn raise_nofile() -> Result<u64, String> {
    if prlimit_nofile(NOFILE) {
        return Ok(NOFILE);
    }
    let hard = hard_nofile().ok_or("cannot read the open-files limit")?;
    if prlimit_nofile(hard) {
        Ok(hard)
    } else {
        Err(format!("prlimit --nofile={hard} failed"))
    }
}

/// The echo server's process (`PALISADE_BENCH_ROLE=echo`): the app end of every connection
/// in a process of its own, so that no process but the proxies holds two fds per connection.
pub fn echo_role() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!(
            "READY {} 0.0.0.0:0 0.0.0.0:0",
            listener.local_addr().unwrap()
        );
        std::io::stdout().flush().unwrap();
        tokio::spawn(echo_server(listener));
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        })
        .await;
    });
}

/// Echoes every byte back, one task per connection, until the peer closes.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One connection through `addr`, with one line echoed end to end.
async fn open_one(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let line = b"palisade idle\n";
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(line).await?;
        let mut back = [0u8; 14];
        s.read_exact(&mut back).await?;
        if &back != line {
            return Err(std::io::Error::other("echo differs"));
        }
        Ok(s)
    })
    .await
    .map_err(|_| std::io::Error::other("no echo in 10 s"))?
}

async fn open_all(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while open.len() + failed < n {
        while started < n && pending.len() < OPENING {
            pending.spawn(open_one(addr));
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(s))) => open.push(s),
            _ => failed += 1,
        }
    }
    (open, failed)
}

/// Waits (at most `limit`) until both proxies hold no more fds than at `base`.
fn wait_for_fds(pids: [u32; 2], base: [Footprint; 2], limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until
        && pids
            .iter()
            .zip(base)
            .any(|(p, b)| footprint(*p).fds > b.fds)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run() -> Result<(), String> {
    let nofile = raise_nofile()?;
    // With pooled tunnels (the default) each proxy holds one fd per connection (the app's side;
    // the tunnels between them are few), and some of its own; without them, two.
    let connections = CONNECTIONS.min(nofile.saturating_sub(512) as usize);
    if connections < CONNECTIONS {
        println!(
            "open-files limit {nofile} (the hard limit could not be raised): {connections} connections, not {CONNECTIONS}"
        );
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    make_certs(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let app = ProxyProc::spawn(dir.path(), "echo", &[]);
    let (client, server): (ProxyProc, ProxyProc) = pair(dir.path(), app.inbound.port(), 1, &[]);
    let pids = [client.child.id(), server.child.id()];
    let names = ["client proxy", "server proxy"];
    std::thread::sleep(Duration::from_millis(500));
    let base = pids.map(footprint);
    println!("\n== {connections} idle connections through one palisade pair ==");
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "", "VmRSS KiB", "RssAnon", "RssFile", "Pss", "threads", "fds"
    );
    let show = |label: &str, f: [Footprint; 2]| {
        for (name, f) in names.iter().zip(f) {
            println!(
                "{:<34} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
                format!("{name}, {label}"),
                f.rss,
                f.anon,
                f.file,
                f.pss,
                f.threads,
                f.fds
            );
        }
    };
    show("idle", base);
    let mut held_kib = [0.0f64; 2];
    let mut last = base;
    for round in 1..=ROUNDS {
        let started = Instant::now();
        let (conns, failed) = rt.block_on(open_all(client.outbound, connections));
        let took = started.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let held = pids.map(footprint);
        println!(
            "round {round}: {} open, {failed} failed, in {:.1} s",
            conns.len(),
            took.as_secs_f64()
        );
        show(&format!("{} open", conns.len()), held);
        for k in 0..2 {
            let per = held[k].rss.saturating_sub(base[k].rss) as f64 / conns.len().max(1) as f64;
            held_kib[k] = held_kib[k].max(per);
            println!(
                "{:<34} {:>9.1} KiB per connection, {:.2} fds per connection",
                names[k],
                per,
                held[k].fds.saturating_sub(base[k].fds) as f64 / conns.len().max(1) as f64
            );
        }
        drop(conns);
        wait_for_fds(pids, base, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(1));
        let after = pids.map(footprint);
        last = after;
        show("after close", after);
        for k in 0..2 {
            println!(
                "{:<34} growth after close: RSS {:+} KiB, fds {:+}",
                names[k],
                after[k].rss as i64 - base[k].rss as i64,
                after[k].fds as i64 - base[k].fds as i64
            );
        }
    }
    let worst = held_kib[0].max(held_kib[1]);
    println!(
        "target: <= 16 KiB per connection per proxy: {worst:.1} KiB, {}",
        if worst <= 16.0 { "met" } else { "NOT MET" }
    );
    let fds_back = (0..2).all(|k| last[k].fds <= base[k].fds);
    println!(
        "target: fds back to the idle count after close: {}",
        if fds_back { "met" } else { "NOT MET" }
    );
    let idle = base[0].rss.max(base[1].rss);
    println!(
        "target: idle RSS per proxy <= 4096 KiB: {idle} KiB, {}",
        if idle <= 4096 { "met" } else { "NOT MET" }
    );
    Ok(())
}
