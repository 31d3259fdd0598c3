//! The progress line on stderr: one line rewritten in place on a terminal, one line per step
//! otherwise (so a log or CI output stays readable).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::time::Instant;

/// Longest line written on a terminal, so that a rewrite never wraps.
const MAX_WIDTH: usize = 110;

pub struct Progress {
    terminal: bool,
    started: Instant,
    /// Whether the terminal line holds text that `clear` must erase.
    shown: Mutex<bool>,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            started: Instant::now(),
            shown: Mutex::new(false),
        }
    }

    /// Seconds since the demo started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A new step.
    pub fn step(&self, what: &str) {
        self.write(what, true);
    }

    /// How a long step is going: shown on a terminal only.
    pub fn detail(&self, what: &str) {
        self.write(what, false);
    }

    /// Erases the line (before the report is printed).
    pub fn clear(&self) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if self.terminal && *shown {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
            *shown = false;
        }
    }

    fn write(&self, what: &str, new_step: bool) {
        let line = progress_line(self.elapsed(), what);
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if self.terminal {
            eprint!("\r\x1b[2K{}", truncate(&line, MAX_WIDTH));
            let _ = std::io::stderr().flush();
            *shown = true;
        } else if new_step {
            eprintln!("{line}");
        }
    }
}

/// `[  3.4s] what`. Pure.
pub fn progress_line(elapsed_seconds: f64, what: &str) -> String {
    format!("[{elapsed_seconds:5.1}s] {what}")
}

fn truncate(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_elapsed_time_and_never_wrap() {
        assert_eq!(
            progress_line(3.42, "starting the CA"),
            "[  3.4s] starting the CA"
        );
        let long = "x".repeat(200);
        assert_eq!(truncate(&long, 10).chars().count(), 10);
        assert_eq!(truncate("short", 10), "short");
    }
}
