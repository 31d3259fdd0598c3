//! Renewing before the half-life schedule: when the CA asks (a rotation drains the leaves of
//! the previous intermediate) and when the trust bundle changes under the current leaf. The
//! mesh watch and the anchors file ask; the rotation task acts. A renewal only ever moves
//! earlier, never later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_ca_api::wire::{MAX_TTL_SECONDS, RenewRequest};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::time::Instant;

use super::store::CertStore;

/// The earliest moment asked for, and a count of asks so that an attempt forgets only the asks
/// made before it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    pub by: Option<Instant>,
    seq: u64,
}

/// Requests for an early renewal, shared by those who ask and the rotation task.
pub struct EarlyRenewal {
    store: Arc<CertStore>,
    /// The intermediate (`unless_issued_by`) of the last `renew` directive acted on.
    directive: Mutex<Option<String>>,
    ask: watch::Sender<Ask>,
}

impl std::fmt::Debug for EarlyRenewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyRenewal")
            .field("ask", &*self.ask.borrow())
            .finish_non_exhaustive()
    }
}

impl EarlyRenewal {
    pub fn new(store: Arc<CertStore>) -> Self {
        EarlyRenewal {
            store,
            directive: Mutex::new(None),
            ask: watch::Sender::new(Ask::default()),
        }
    }

    /// A `renew` directive from the mesh watch: a valid leaf not issued by the named
    /// intermediate is renewed at a uniformly random moment within the window, so that a
    /// fleet spreads its requests. A directive is acted on once: repeating it (every watch
    /// message carries it) changes nothing, unless it now asks for a moment sooner than the
    /// one chosen. Without a valid leaf the rotation task is already retrying: nothing to do.
    pub fn directive(&self, request: &RenewRequest) {
        let Some(leaf) = self.store.valid() else {
            return;
        };
        let mut acted_on = self.directive.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let pending = self
            .ask
            .borrow()
            .by
            .map(|by| by.saturating_duration_since(now));
        let Some(delay) = directive_delay(
            leaf.issuer.as_deref(),
            request,
            acted_on.as_deref(),
            pending,
            super::rotation::random_unit(),
        ) else {
            return;
        };
        *acted_on = Some(request.unless_issued_by.clone());
        if self.ask_by(now + delay) {
            tracing::info!(
                unless_issued_by = %request.unless_issued_by,
                within_seconds = request.within_seconds,
                renew_in_ms = delay.as_millis() as u64,
                "the CA asked for an early renewal: the certificate is not from its current intermediate"
            );
        }
    }

    /// Renew at once.
    pub fn now(&self) {
        self.ask_by(Instant::now());
    }

    /// After the trust bundle changed to `roots`: renew at once unless the current leaf
    /// chains to them (peers trusting only the new roots would refuse it).
    pub fn unless_leaf_chains_to(&self, roots: &[CertificateDer<'static>]) {
        if !self.store.leaf_chains_to(roots) {
            tracing::info!("the certificate does not chain to the new trust bundle: renewing now");
            self.now();
        }
    }

    /// Asks for a renewal at `at` unless one is asked earlier already; true when it changed.
    fn ask_by(&self, at: Instant) -> bool {
        self.ask.send_if_modified(|ask| {
            if ask.by.is_some_and(|by| by <= at) {
                return false;
            }
            ask.by = Some(at);
            ask.seq += 1;
            true
        })
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Ask> {
        self.ask.subscribe()
    }

    /// After a renewal attempt that started when `seen` asks had been made: those asks are
    /// answered, whether it succeeded or not (a failure retries with backoff). An ask made
    /// during the attempt stays.
    pub(super) fn answered(&self, seen: &Ask) {
        self.ask.send_if_modified(|ask| {
            if ask.seq == seen.seq {
                ask.by = None;
            }
            // The rotation task, the only receiver, is the one clearing it.
            false
        });
    }
}

/// How long from now to renew for `request`, or `None` to leave the schedule as it is. Pure:
/// `leaf_issuer` is the issuer of the valid leaf, `acted_on` the directive last acted on,
/// `pending` how far away an early renewal already asked for is, `unit` a number in `0..=1`.
pub fn directive_delay(
    leaf_issuer: Option<&str>,
    request: &RenewRequest,
    acted_on: Option<&str>,
    pending: Option<Duration>,
    unit: f64,
) -> Option<Duration> {
    let target = request.unless_issued_by.as_str();
    if leaf_issuer == Some(target) {
        return None;
    }
    // A window past a certificate's longest lifetime asks nothing the schedule does not.
    let window = Duration::from_secs(request.within_seconds.min(MAX_TTL_SECONDS));
    if acted_on == Some(target) && pending.is_none_or(|p| p <= window) {
        return None;
    }
    Some(window.mul_f64(unit.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "11";
    const OLD: &str = "22";

    fn renew(within_seconds: u64) -> RenewRequest {
        RenewRequest {
            unless_issued_by: NEW.into(),
            within_seconds,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_leaf_of_the_named_intermediate_is_left_alone() {
        assert_eq!(
            directive_delay(Some(NEW), &renew(60), None, None, 0.5),
            None
        );
    }

    #[test]
    fn another_leaf_renews_at_a_random_moment_within_the_window() {
        assert_eq!(
            directive_delay(Some(OLD), &renew(60), None, None, 0.5),
            Some(secs(30))
        );
        assert_eq!(
            directive_delay(None, &renew(60), None, None, 1.0),
            Some(secs(60))
        );
        assert_eq!(
            directive_delay(Some(OLD), &renew(60), None, None, 7.0),
            Some(secs(60)),
            "never past the window"
        );
    }

    #[test]
    fn a_repeated_directive_neither_renews_again_nor_draws_again() {
        // Acted on and renewed already: nothing, whatever the draw.
        assert_eq!(
            directive_delay(Some(OLD), &renew(60), Some(NEW), None, 0.0),
            None
        );
        // Acted on and pending within the window: the moment chosen stays (drawing again on
        // every message would pull every proxy towards now).
        assert_eq!(
            directive_delay(Some(OLD), &renew(60), Some(NEW), Some(secs(50)), 0.0),
            None
        );
        // The CA now asks for sooner than the moment chosen: drawn again within the new window.
        assert_eq!(
            directive_delay(Some(OLD), &renew(10), Some(NEW), Some(secs(50)), 0.5),
            Some(secs(5))
        );
        // Another directive is acted on.
        assert_eq!(
            directive_delay(Some(OLD), &renew(60), Some("33"), None, 0.5),
            Some(secs(30))
        );
    }

    #[test]
    fn a_huge_window_is_bounded() {
        assert_eq!(
            directive_delay(Some(OLD), &renew(u64::MAX), None, None, 1.0),
            Some(secs(MAX_TTL_SECONDS))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn asks_only_move_earlier_and_an_attempt_answers_the_asks_before_it() {
        let early = EarlyRenewal::new(Arc::new(CertStore::new(crate::clock::Clock::system())));
        let mut rx = early.subscribe();
        let t0 = Instant::now();
        assert!(early.ask_by(t0 + secs(30)));
        assert!(!early.ask_by(t0 + secs(40)), "later is ignored");
        assert!(early.ask_by(t0 + secs(10)));
        assert_eq!(rx.borrow_and_update().by, Some(t0 + secs(10)));

        let seen = *rx.borrow_and_update();
        early.now(); // during the attempt
        early.answered(&seen);
        assert_eq!(
            rx.borrow().by,
            Some(t0),
            "an ask made during the attempt stays"
        );
        let seen = *rx.borrow_and_update();
        early.answered(&seen);
        assert_eq!(rx.borrow().by, None);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_valid_leaf_a_directive_does_nothing() {
        let early = EarlyRenewal::new(Arc::new(CertStore::new(crate::clock::Clock::system())));
        early.directive(&renew(1));
        assert_eq!(early.subscribe().borrow().by, None);
    }
}
