//! When to renew and how long to wait after a failure: pure functions.

use std::time::Duration;

/// Unix time at which to renew a certificate valid from `not_before` to `not_after` and
/// received at `received`: at half its usable lifetime, moved by `jitter` (in `-1.0..=1.0`)
/// times 10% of that lifetime. The usable lifetime starts when the certificate arrived, not at
/// `not_before`: the CA backdates `not_before` by a minute to tolerate clock skew, and counting
/// that minute would renew a short-lived certificate at once (a 1-minute certificate would be
/// renewed in a loop).
pub fn renew_at(not_before: i64, not_after: i64, received: i64, jitter: f64) -> i64 {
    let start = not_before.max(received);
    let lifetime = (not_after - start).max(0) as f64;
    let jitter = jitter.clamp(-1.0, 1.0);
    start + (lifetime * (0.5 + 0.1 * jitter)).round() as i64
}

/// Wait before retry number `attempt` (0 for the first retry): `base` doubled each time,
/// capped at `cap`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// [`backoff`] with equal jitter: a wait drawn uniformly from its upper half, so that proxies
/// refused together (a CA restart, a renewal storm) do not all come back at the same instant,
/// while each still waits at least half the step and never more than it (nor more than `cap`).
pub fn jittered_backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    equal_jitter(backoff(attempt, base, cap), fastrand::f64())
}

/// `wait` moved into its upper half by `unit` (in `0.0..=1.0`): half of `wait` at 0, all of it
/// at 1.
pub fn equal_jitter(wait: Duration, unit: f64) -> Duration {
    let half = wait / 2;
    half + (wait - half).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_within_ten_percent() {
        assert_eq!(renew_at(1000, 4600, 1000, 0.0), 2800);
        assert_eq!(renew_at(1000, 4600, 1000, 1.0), 1000 + 2160);
        assert_eq!(renew_at(1000, 4600, 1000, -1.0), 1000 + 1440);
        // Jitter outside the range is clamped, never past 60%.
        assert_eq!(renew_at(1000, 4600, 1000, 7.0), 1000 + 2160);
        // A nonsense validity renews immediately.
        assert_eq!(renew_at(1000, 900, 1000, 0.0), 1000);
    }

    #[test]
    fn the_backdated_minute_does_not_count() {
        // Issued at 1060 with not_before backdated to 1000 and a 60 s lifetime: renew at 1090,
        // not at once (half of 1000..1120 would be 1060, the moment it arrived).
        assert_eq!(renew_at(1000, 1120, 1060, 0.0), 1090);
        // A receipt time before not_before (a clock behind the CA's) starts at not_before.
        assert_eq!(renew_at(1000, 4600, 900, 0.0), 2800);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        let waits: Vec<u64> = (0..9).map(|a| backoff(a, b, cap).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(200, b, cap), cap);
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half() {
        let d = Duration::from_secs(8);
        assert_eq!(equal_jitter(d, 0.0), Duration::from_secs(4));
        assert_eq!(equal_jitter(d, 1.0), d);
        assert_eq!(equal_jitter(d, 0.5), Duration::from_secs(6));
        assert_eq!(equal_jitter(d, 7.0), d, "out of range is clamped");
    }

    #[test]
    fn jittered_backoff_is_spread_and_bounded() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in [0, 1, 3, 6, 10] {
            let step = backoff(attempt, base, cap);
            let waits: Vec<Duration> = (0..1000)
                .map(|_| jittered_backoff(attempt, base, cap))
                .collect();
            assert!(
                waits
                    .iter()
                    .all(|w| *w >= step / 2 && *w <= step && *w <= cap),
                "attempt {attempt}: a wait outside {:?}..={step:?}",
                step / 2
            );
            // Spread: a thousand proxies refused at once land across the range, not together.
            let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
            assert!(
                *hi - *lo > step * 4 / 10,
                "attempt {attempt}: waits bunched in {lo:?}..{hi:?}"
            );
            let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
            assert!(distinct.len() > 900, "attempt {attempt}: waits repeat");
        }
    }
}
