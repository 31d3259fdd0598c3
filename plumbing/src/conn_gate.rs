//! Admission of connections before any work is done for them: at most so many open in all and
//! so many per source address. A connection over either cap is refused (closed at once), so a
//! flood from one address neither starves the others nor blocks the accept loop. And the
//! rate-limited warning every listener writes when one of its bounds bites.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{CounterFamily, Exposition, Kind};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// As many connections as the listener allows are open.
    TotalCap,
    /// As many connections as one source may hold are open from this address.
    SourceCap,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TotalCap => "total_cap",
            Refusal::SourceCap => "source_cap",
        }
    }
}

/// Counts open connections, in all and per source address.
#[derive(Debug)]
pub struct ConnectionGate {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// An admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<ConnectionGate>,
    source: IpAddr,
}

impl ConnectionGate {
    /// `max_total` and `max_per_source` of at least one (0 is read as 1).
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(ConnectionGate {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            open: Mutex::new(Open::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `source`, or says which cap it would pass.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionPermit, Refusal> {
        // An IPv4 client on a dual-stack socket is the same source as on a v4 socket.
        let source = source.to_canonical();
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(Refusal::TotalCap);
        }
        let from_source = open.per_source.entry(source).or_default();
        if *from_source >= self.max_per_source {
            return Err(Refusal::SourceCap);
        }
        *from_source += 1;
        open.total += 1;
        Ok(ConnectionPermit {
            gate: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.per_source.remove(&self.source);
            }
        }
    }
}

/// At most one warning per kind per interval; the lines skipped in between are counted and
/// reported with the next one, so a flood shows in the log without flooding it.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(skipped)` when a line of `kind` may be written now (`skipped` lines were not).
    pub fn allow(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(kind) {
            Some((at, skipped)) if now.duration_since(*at) < self.every => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

impl Default for LogThrottle {
    /// One line per kind every 10 seconds.
    fn default() -> Self {
        LogThrottle::new(Duration::from_secs(10))
    }
}

/// What a listener's bounds did: connections open, refused (by [`Refusal`]) and closed by a
/// timeout (by which one), rendered under a prefix such as `palisade_ca_api`.
#[derive(Debug)]
pub struct ConnectionStats {
    open: AtomicI64,
    refused: CounterFamily,
    closed: CounterFamily,
    log: LogThrottle,
    listener: &'static str,
}

impl ConnectionStats {
    /// `listener` names the port in log lines (`api`, `admin`).
    pub fn new(listener: &'static str) -> Self {
        ConnectionStats {
            open: AtomicI64::new(0),
            refused: CounterFamily::default(),
            closed: CounterFamily::default(),
            log: LogThrottle::default(),
            listener,
        }
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// A connection from `peer` was refused; counted, and logged at most every 10 s.
    pub fn refused(&self, why: Refusal, peer: IpAddr) {
        self.refused.add(&[("reason", why.as_str())], 1);
        if let Some(skipped) = self.log.allow(why.as_str(), Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                peer.ip = %peer,
                reason = why.as_str(),
                skipped,
                "connection refused: the listener's connection cap is reached"
            );
        }
    }

    /// A connection from `peer` was closed because `bound` (a timeout or limit) bit; counted,
    /// and logged at most every 10 s per bound.
    pub fn closed_by(&self, bound: &'static str, peer: IpAddr) {
        self.closed.add(&[("reason", bound)], 1);
        if let Some(skipped) = self.log.allow(bound, Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                peer.ip = %peer,
                reason = bound,
                skipped,
                "connection closed by a bound"
            );
        }
    }

    /// Refusals for `why` so far.
    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused.get(&[("reason", why.as_str())])
    }

    /// Connections closed by `bound` so far.
    pub fn closed_count(&self, bound: &str) -> u64 {
        self.closed.get(&[("reason", bound)])
    }

    /// `<prefix>_connections`, `<prefix>_connections_refused_total{reason}` and
    /// `<prefix>_connections_closed_total{reason}`.
    pub fn encode(&self, out: &mut Exposition, prefix: &str) {
        out.single(
            &format!("{prefix}_connections"),
            Kind::Gauge,
            "Connections open.",
            self.open.load(Ordering::Relaxed),
        );
        self.refused.encode(
            out,
            &format!("{prefix}_connections_refused_total"),
            "Connections refused at accept, by the cap that was reached (total_cap, source_cap).",
        );
        self.closed.encode(
            out,
            &format!("{prefix}_connections_closed_total"),
            "Connections closed because a timeout or limit bit, by which one.",
        );
    }
}

/// A connection counted as open; see [`ConnectionStats::track`].
#[derive(Debug)]
pub struct OpenConnection(Arc<ConnectionStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_source_and_frees_on_drop() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::SourceCap);
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), Refusal::TotalCap);
        assert_eq!(gate.open(), 3);
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(b).is_ok(), "a freed place is taken again");
    }

    #[test]
    fn a_mapped_v4_address_is_the_same_source() {
        let gate = ConnectionGate::new(10, 1);
        let _v4 = gate.admit("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            gate.admit("::ffff:127.0.0.2".parse().unwrap()).unwrap_err(),
            Refusal::SourceCap
        );
    }

    #[test]
    fn throttle_writes_one_line_per_interval_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow("x", t0), Some(0));
        assert_eq!(t.allow("x", t0 + Duration::from_secs(1)), None);
        assert_eq!(t.allow("x", t0 + Duration::from_secs(2)), None);
        assert_eq!(t.allow("y", t0), Some(0), "kinds are apart");
        assert_eq!(t.allow("x", t0 + Duration::from_secs(11)), Some(2));
    }
}
