//! Outbound balancing over a Service's endpoints: power of two choices over the connections
//! this proxy has open to each endpoint, skipping endpoints that refused a connection in the
//! last few seconds.
//!
//! Why this choice: picking the less loaded of two random endpoints costs two map lookups per
//! connection whatever the size of the Service, needs no shared view of the endpoints' load,
//! and avoids the herd that "least connections over all endpoints" causes when many proxies
//! see the same counts. Open connections are the load signal because a proxy relays bytes and
//! does not see requests; an endpoint that holds connections longer (slower) gets fewer new
//! ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mesh::Target;

/// How long an endpoint that failed a connect is passed over while others are available.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(5);
/// Past this many tracked endpoints, idle ones whose penalty is over are forgotten.
const PRUNE_ABOVE: usize = 4096;

#[derive(Debug, Default)]
struct EndpointLoad {
    open: usize,
    failed_until: Option<Instant>,
}

impl EndpointLoad {
    fn penalized(&self, now: Instant) -> bool {
        self.failed_until.is_some_and(|t| t > now)
    }
}

/// Open connections and recent failures per endpoint address, shared by every outbound
/// connection of the proxy. Holds only endpoints with open connections or a running penalty.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, EndpointLoad>>,
}

/// One connection counted against an endpoint until dropped.
#[derive(Debug)]
pub struct Lease {
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Lease {
    /// The endpoint this lease counts against.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.balancer.lock();
        if let Some(load) = map.get_mut(&self.addr) {
            load.open = load.open.saturating_sub(1);
            if load.open == 0 && !load.penalized(Instant::now()) {
                map.remove(&self.addr);
            }
        }
    }
}

impl Balancer {
    pub fn new() -> Arc<Self> {
        Arc::new(Balancer::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, EndpointLoad>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks one of `targets` not in `tried`: the less loaded of two random ones, preferring
    /// endpoints without a running failure penalty. `None` when every target was tried.
    pub fn pick<'t>(&self, targets: &'t [Target], tried: &[SocketAddr]) -> Option<&'t Target> {
        let now = Instant::now();
        let map = self.lock();
        let load = |t: &Target| map.get(&t.addr);
        let usable = |t: &&Target| !tried.contains(&t.addr);
        let healthy = |t: &&Target| !load(t).is_some_and(|l| l.penalized(now));
        // The common case, nothing tried and nothing penalized: two random indices, no scan.
        if tried.is_empty() && targets.len() >= 2 {
            let (a, b) = two_distinct(targets.len());
            let (a, b) = (&targets[a], &targets[b]);
            match (healthy(&a), healthy(&b)) {
                (true, true) => return Some(less_loaded(a, b, |t| load(t).map_or(0, |l| l.open))),
                (true, false) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
        let mut candidates: Vec<&Target> = targets.iter().filter(usable).filter(healthy).collect();
        if candidates.is_empty() {
            // Every untried endpoint failed lately: try them anyway rather than refuse.
            candidates = targets.iter().filter(usable).collect();
        }
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let (a, b) = two_distinct(n);
                Some(less_loaded(candidates[a], candidates[b], |t| {
                    load(t).map_or(0, |l| l.open)
                }))
            }
        }
    }

    /// Counts a connection to `addr` until the lease is dropped.
    pub fn lease(self: &Arc<Self>, addr: SocketAddr) -> Lease {
        self.lock().entry(addr).or_default().open += 1;
        Lease {
            balancer: self.clone(),
            addr,
        }
    }

    /// Records that `addr` refused or timed out a connect: passed over for [`FAILURE_PENALTY`]
    /// while other endpoints are available.
    pub fn failed(&self, addr: SocketAddr) {
        let now = Instant::now();
        let mut map = self.lock();
        map.entry(addr).or_default().failed_until = Some(now + FAILURE_PENALTY);
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, l| l.open > 0 || l.penalized(now));
        }
    }

    /// Connections open to `addr` (tests and metrics).
    pub fn open(&self, addr: SocketAddr) -> usize {
        self.lock().get(&addr).map_or(0, |l| l.open)
    }

    /// Endpoints tracked now (bounded by open connections plus recent failures).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
}

fn less_loaded<'t>(a: &'t Target, b: &'t Target, open: impl Fn(&Target) -> usize) -> &'t Target {
    if open(b) < open(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: u8) -> Vec<Target> {
        (1..=n)
            .map(|i| Target {
                addr: SocketAddr::from(([10, 77, 0, i], 8080)),
                identity: None,
            })
            .collect()
    }

    #[test]
    fn two_choices_spread_new_connections_and_follow_load() {
        let b = Balancer::new();
        let ts = targets(2);
        // Connections that stay open: the second choice always wins, so they alternate.
        let mut leases = Vec::new();
        for _ in 0..10 {
            let t = b.pick(&ts, &[]).unwrap();
            leases.push(b.lease(t.addr));
        }
        assert_eq!((b.open(ts[0].addr), b.open(ts[1].addr)), (5, 5));
        drop(leases);
        assert_eq!(b.tracked(), 0, "closed connections leave nothing behind");
        // An endpoint holding many connections gets the new ones only when both choices are it.
        let _busy: Vec<Lease> = (0..50).map(|_| b.lease(ts[0].addr)).collect();
        for _ in 0..20 {
            assert_eq!(b.pick(&ts, &[]).unwrap().addr, ts[1].addr);
        }
    }

    #[test]
    fn picks_are_random_over_many_endpoints() {
        let b = Balancer::new();
        let ts = targets(10);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..400 {
            seen.insert(b.pick(&ts, &[]).unwrap().addr);
        }
        assert_eq!(seen.len(), 10);
    }

    #[test]
    fn failed_endpoints_are_passed_over_and_retries_skip_what_was_tried() {
        let b = Balancer::new();
        let ts = targets(3);
        b.failed(ts[0].addr);
        for _ in 0..100 {
            assert_ne!(b.pick(&ts, &[]).unwrap().addr, ts[0].addr);
        }
        let tried = [ts[1].addr, ts[2].addr];
        assert_eq!(
            b.pick(&ts, &tried).unwrap().addr,
            ts[0].addr,
            "a penalized endpoint is still tried when nothing else is left"
        );
        let all: Vec<SocketAddr> = ts.iter().map(|t| t.addr).collect();
        assert!(b.pick(&ts, &all).is_none());
        assert!(b.pick(&[], &[]).is_none());
        assert_eq!(b.pick(&ts[..1], &[]).unwrap().addr, ts[0].addr);
    }
}
