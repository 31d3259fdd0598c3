//! Whether the API port is near its connection cap. Past the high mark, a connection that has
//! been served and has nothing in flight is closed at once instead of after the idle timeout:
//! a proxy keeps its connection to the CA pooled after its certificate, and in a renewal storm
//! those idle connections would hold every place while the proxies still waiting are refused
//! (each one's backoff growing) for a whole idle timeout. Connections that have not sent their
//! first request yet are left to the header timeout. The low mark below the high one keeps the
//! state from flapping at each connection.

use tokio::sync::watch;

/// Near the cap from `high` connections open, until fewer than `low` are.
#[derive(Debug)]
pub(super) struct Pressure {
    high: usize,
    low: usize,
    state: watch::Sender<bool>,
}

impl Pressure {
    /// Marks at 90% and 80% of `max_connections`.
    pub fn new(max_connections: usize) -> Self {
        let max = max_connections.max(1);
        Pressure {
            high: max - max / 10,
            low: max - max / 5,
            state: watch::channel(false).0,
        }
    }

    /// Takes note that `open` connections are open now; tells the subscribers only when the
    /// state changes.
    pub fn update(&self, open: usize) {
        self.state.send_if_modified(|near_cap| {
            let now = if *near_cap {
                open >= self.low
            } else {
                open >= self.high
            };
            std::mem::replace(near_cap, now) != now
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_the_cap_from_the_high_mark_until_below_the_low_one() {
        let p = Pressure::new(10_000);
        let near = p.subscribe();
        p.update(8_999);
        assert!(!*near.borrow());
        p.update(9_000);
        assert!(*near.borrow());
        p.update(8_000);
        assert!(*near.borrow(), "between the marks the state holds");
        p.update(7_999);
        assert!(!*near.borrow());
        p.update(8_500);
        assert!(!*near.borrow(), "between the marks the state holds");
    }

    #[test]
    fn a_small_cap_is_near_only_when_full() {
        let p = Pressure::new(2);
        let near = p.subscribe();
        p.update(1);
        assert!(!*near.borrow());
        p.update(2);
        assert!(*near.borrow());
        p.update(1);
        assert!(!*near.borrow());
    }

    #[test]
    fn subscribers_hear_only_changes() {
        let p = Pressure::new(100);
        let mut near = p.subscribe();
        p.update(10);
        assert!(!near.has_changed().unwrap());
        p.update(95);
        assert!(near.has_changed().unwrap());
        near.borrow_and_update();
        p.update(99);
        assert!(!near.has_changed().unwrap());
    }
}
