//! A per-identity token bucket, bounded in the number of identities it remembers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Identities remembered at most; past this, idle full buckets are forgotten.
const MAX_TRACKED: usize = 100_000;

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_second` requests per identity on average, bursts up to `burst`; 0 disables the limit.
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(seconds)` says when to retry.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), u64> {
        if self.per_second == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(key) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil() as u64)
        }
    }
}

impl RateLimiter {
    /// Returns the token a [`check`](Self::check) of `key` took (the request turned out to be
    /// one the limit is not about).
    pub fn give_back(&self, key: &str) {
        if self.per_second == 0.0 {
            return;
        }
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if let Some((tokens, _)) = buckets.get_mut(key) {
            *tokens = (*tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_per_identity() {
        let rl = RateLimiter::new(2, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check("a", t0).is_ok());
        }
        assert_eq!(rl.check("a", t0), Err(1));
        assert!(
            rl.check("b", t0).is_ok(),
            "another identity has its own bucket"
        );
        assert!(rl.check("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(rl.check("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_token_given_back_can_be_taken_again() {
        let rl = RateLimiter::new(1, 2);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(rl.check("a", t0).is_ok());
            rl.give_back("a");
        }
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0).is_err());
        rl.give_back("a");
        rl.give_back("a");
        rl.give_back("a");
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0).is_ok());
        assert!(rl.check("a", t0).is_err(), "never more than the burst");
    }

    #[test]
    fn zero_disables() {
        let rl = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert!(rl.check("a", Instant::now()).is_ok());
        }
    }
}
