//! Wall-clock time for certificate validity, anchored to tokio's clock in tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where "now" comes from. Production uses the system clock; tests use a clock that moves
/// with tokio's (paused) clock so rotation can be tested without sleeping.
#[derive(Clone)]
pub struct Clock(Arc<ClockKind>);

enum ClockKind {
    System,
    Anchored {
        wall: SystemTime,
        start: tokio::time::Instant,
    },
}

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(ClockKind::System))
    }

    /// A clock that reads `wall` now and then advances with `tokio::time::Instant`.
    pub fn anchored(wall: SystemTime) -> Self {
        Clock(Arc::new(ClockKind::Anchored {
            wall,
            start: tokio::time::Instant::now(),
        }))
    }

    pub fn now(&self) -> SystemTime {
        match &*self.0 {
            ClockKind::System => SystemTime::now(),
            ClockKind::Anchored { wall, start } => *wall + start.elapsed(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> i64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs() as i64
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            ClockKind::System => f.write_str("Clock::System"),
            ClockKind::Anchored { .. } => f.write_str("Clock::Anchored"),
        }
    }
}
