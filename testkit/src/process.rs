//! Long-running child processes of a test: each writes to a log file of its own, all are
//! stopped on drop, and their log tails are printed when the test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process started by [`Processes::spawn`].
#[derive(Clone, Copy, Debug)]
pub struct ProcessId(usize);

struct Process {
    what: String,
    child: Child,
}

/// The children of a test, logging to `<what>.log` in one directory.
pub struct Processes {
    log_dir: PathBuf,
    running: Vec<Process>,
}

impl Processes {
    pub fn new(log_dir: &Path) -> Processes {
        Processes {
            log_dir: log_dir.to_owned(),
            running: Vec::new(),
        }
    }

    pub fn log_path(&self, what: &str) -> PathBuf {
        self.log_dir.join(format!("{what}.log"))
    }

    /// Starts `cmd` with its output going to `<what>.log`; it is stopped with the others.
    pub fn spawn(&mut self, what: &str, mut cmd: Command) -> ProcessId {
        let log = fs::File::create(self.log_path(what)).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        self.running.push(Process {
            what: what.to_owned(),
            child,
        });
        ProcessId(self.running.len() - 1)
    }

    /// The log of a process started here, empty when there is none.
    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.log_path(what)).unwrap_or_default()
    }

    /// Stops one process (see [`terminate`]).
    pub fn stop(&mut self, id: ProcessId) {
        terminate(&mut self.running[id.0].child);
    }

    /// The process id of one process.
    pub fn pid(&self, id: ProcessId) -> u32 {
        self.running[id.0].child.id()
    }

    /// Kills one process at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self, id: ProcessId) {
        let child = &mut self.running[id.0].child;
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops every process.
    pub fn stop_all(&mut self) {
        for p in &mut self.running {
            terminate(&mut p.child);
        }
    }

    /// Panics naming any process that is still running.
    pub fn assert_all_exited(&mut self) {
        for p in &mut self.running {
            assert!(
                p.child.try_wait().ok().flatten().is_some(),
                "{} still running",
                p.what
            );
        }
    }

    /// Prints the last lines (25, or `PALISADE_TEST_LOG_LINES`) of every log in the directory
    /// (after a failure).
    pub fn dump_logs(&self) {
        let Ok(entries) = fs::read_dir(&self.log_dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(
                    std::env::var("PALISADE_TEST_LOG_LINES")
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(25),
                )
                .collect();
            eprintln!("--- {} (last lines)", p.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop_all();
    }
}

/// SIGTERM, then SIGKILL after 3 s; always reaps the child.
pub fn terminate(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .output();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
