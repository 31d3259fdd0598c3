//! Denials (and audit would-denies) as one structured JSON event each, rate-limited so that a
//! flood of refused callers cannot flood the log. Suppressed events are counted and reported
//! with the next event that gets through.

use std::sync::Mutex;

use serde::Serialize;
use tokio::time::Instant;

/// One policy event, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct DenialEvent {
    /// `deny` or `audit_deny`.
    pub result: &'static str,
    /// The caller's SPIFFE ID, or `unauthenticated`.
    pub caller: String,
    pub caller_address: String,
    /// `namespace/name` of the workload protected, when known.
    pub target: String,
    pub port: u16,
    /// The policy that decided (`namespace/name`, or `default:<policy>`).
    pub policy: String,
    pub reason: &'static str,
}

/// Throttles log lines (not traffic): a token bucket of `burst` lines at once, refilled at
/// `per_second`; what it holds back is counted and reported with the next line let through.
#[derive(Debug)]
pub struct LogThrottle {
    state: Mutex<Bucket>,
    per_second: f64,
    burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(per_second: u32, burst: u32) -> Self {
        LogThrottle {
            state: Mutex::new(Bucket {
                tokens: burst as f64,
                at: Instant::now(),
                suppressed: 0,
            }),
            per_second: per_second as f64,
            burst: burst as f64,
        }
    }

    /// `Some(suppressed since the last admitted event)` when this event may be logged.
    pub fn admit(&self) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

/// Logs denial events through `tracing` (target `palisade::policy`) as one JSON field.
#[derive(Debug)]
pub struct DenialLog {
    limiter: LogThrottle,
}

impl Default for DenialLog {
    fn default() -> Self {
        DenialLog {
            limiter: LogThrottle::new(10, 50),
        }
    }
}

impl DenialLog {
    pub fn new(per_second: u32, burst: u32) -> Self {
        DenialLog {
            limiter: LogThrottle::new(per_second, burst),
        }
    }

    /// Logs `event` unless the rate limit is reached; returns whether it was logged.
    pub fn record(&self, event: &DenialEvent) -> bool {
        let Some(suppressed) = self.limiter.admit() else {
            return false;
        };
        // One event, its fields structured (the JSON log format renders them as JSON keys).
        tracing::warn!(
            target: "palisade::policy",
            result = event.result,
            caller = %event.caller,
            caller_address = %event.caller_address,
            target_workload = %event.target,
            port = event.port,
            policy = %event.policy,
            reason = event.reason,
            suppressed_since_last = suppressed,
            "connection {}",
            if event.result == "deny" { "denied" } else { "would be denied (audit)" }
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bursts_are_limited_and_suppressions_reported() {
        let l = LogThrottle::new(2, 3);
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(l.admit(), Some(2));
        assert_eq!(l.admit(), None);
    }

    #[tokio::test]
    async fn a_denial_is_one_json_log_event_with_every_field() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let log = DenialLog::new(1, 1);
        let event = DenialEvent {
            result: "deny",
            caller: "unauthenticated".into(),
            caller_address: "10.77.0.3:4242".into(),
            target: "shop/api".into(),
            port: 8080,
            policy: "default:all-authenticated".into(),
            reason: "plaintext_not_allowed",
        };
        tracing::subscriber::with_default(subscriber, || {
            assert!(log.record(&event));
            // Past the rate limit: counted, not logged.
            assert!(!log.record(&event));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["target"], "palisade::policy");
        assert_eq!(v["result"], "deny");
        assert_eq!(v["caller"], "unauthenticated");
        assert_eq!(v["caller_address"], "10.77.0.3:4242");
        assert_eq!(v["target_workload"], "shop/api");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["policy"], "default:all-authenticated");
        assert_eq!(v["reason"], "plaintext_not_allowed");
    }

    #[test]
    fn event_serialises_every_field() {
        let e = DenialEvent {
            result: "deny",
            caller: "spiffe://cluster.local/ns/a/sa/b".into(),
            caller_address: "10.77.0.3:4242".into(),
            target: "shop/api".into(),
            port: 8080,
            policy: "shop/api-from-web".into(),
            reason: "no_rule_matched",
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        for k in [
            "result",
            "caller",
            "caller_address",
            "target",
            "port",
            "policy",
            "reason",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
