//! Packet captures with tcpdump in a network namespace, to check what crossed a link.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns;
use crate::process::{ProcessId, Processes, wait_for};

/// A running capture.
pub struct Capture {
    process: ProcessId,
    file: PathBuf,
}

/// Starts capturing TCP `port` on `dev` in `netns` into `file`, as process `what`; returns
/// once tcpdump listens.
pub fn start(
    procs: &mut Processes,
    what: &str,
    netns: &str,
    dev: &str,
    port: u16,
    file: &Path,
) -> Capture {
    let mut cmd = netns::command(netns, None, "tcpdump");
    cmd.args(["-i", dev, "--immediate-mode", "-U", "-s", "0", "-w"])
        .arg(file)
        .args(["tcp", "port", &port.to_string()]);
    let process = procs.spawn(what, cmd);
    wait_for("tcpdump to listen", Duration::from_secs(10), || {
        procs.log(what).contains("listening on")
    });
    Capture {
        process,
        file: file.to_owned(),
    }
}

impl Capture {
    /// Stops the capture and returns the captured bytes (pcap).
    pub fn finish(self, procs: &mut Processes) -> Vec<u8> {
        // tcpdump writes each packet as it comes (-U); give the last ones a moment.
        std::thread::sleep(Duration::from_millis(300));
        procs.stop(self.process);
        std::fs::read(&self.file).unwrap_or_default()
    }
}

/// Whether `needle` occurs in `haystack` (packet captures are bytes).
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
