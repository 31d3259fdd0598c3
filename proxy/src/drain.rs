//! The proxy's shutdown, owned by one type: [`Drain`] holds every stop signal and runs the
//! sequence, so the wiring in `app.rs` only hands out receivers.
//!
//! 1. requested (SIGTERM, `POST /shutdown`, [`Drain::requester`]);
//! 2. draining: not ready, the inbound listener closes; outbound keeps accepting, since the app
//!    may still need it while its own connections finish;
//! 3. once no connection is open, or at the deadline: open connections are aborted and the
//!    background tasks (rotation, mesh watch, admin) stop; then the drain waits for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the drain looks at the number of open connections.
const DRAIN_CHECK: Duration = Duration::from_millis(100);

pub struct Drain {
    requested: watch::Sender<bool>,
    /// Held from the start, so that a request sent before [`Drain::run`] is polled is kept (a
    /// watch channel without receivers drops what is sent).
    request_seen: watch::Receiver<bool>,
    inbound_closed: watch::Sender<bool>,
    aborted: watch::Sender<bool>,
    background_stopped: watch::Sender<bool>,
    /// Never sent: what a listener that stays open through the drain waits on.
    never: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
}

impl Default for Drain {
    fn default() -> Self {
        let (requested, request_seen) = watch::channel(false);
        Drain {
            requested,
            request_seen,
            inbound_closed: watch::Sender::new(false),
            aborted: watch::Sender::new(false),
            background_stopped: watch::Sender::new(false),
            never: watch::Sender::new(false),
            draining: Arc::default(),
        }
    }
}

impl Drain {
    /// Sending `true` on it starts the drain.
    pub fn requester(&self) -> watch::Sender<bool> {
        self.requested.clone()
    }

    /// True from the start of the drain: `/ready` answers 503 from then on.
    pub fn draining(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    /// Stops the inbound listener (phase 2).
    pub fn inbound_stop(&self) -> watch::Receiver<bool> {
        self.inbound_closed.subscribe()
    }

    /// The outbound listener stays open until the process ends.
    pub fn outbound_stop(&self) -> watch::Receiver<bool> {
        self.never.subscribe()
    }

    /// Closes the connections still open (phase 3).
    pub fn abort(&self) -> watch::Receiver<bool> {
        self.aborted.subscribe()
    }

    /// Stops rotation, the mesh watch and the admin port (phase 3).
    pub fn background_stop(&self) -> watch::Receiver<bool> {
        self.background_stopped.subscribe()
    }

    /// Waits for the request, then drains: until `open_connections()` is zero or `timeout`
    /// has passed, then aborts, stops the background and waits for `tasks`.
    pub async fn run(
        self,
        open_connections: impl Fn() -> i64,
        timeout: Duration,
        tasks: Vec<JoinHandle<()>>,
    ) {
        let mut request = self.request_seen.clone();
        let _ = request.wait_for(|r| *r).await;
        self.draining.store(true, Ordering::Release);
        self.inbound_closed.send_replace(true);
        tracing::info!(
            drain_timeout_ms = timeout.as_millis() as u64,
            "draining: not ready, inbound closed, outbound open until its connections end or the deadline"
        );
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open = open_connections();
            if open <= 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    open,
                    "drain deadline reached; closing the remaining connections"
                );
                break;
            }
            tokio::time::sleep(DRAIN_CHECK).await;
        }
        self.aborted.send_replace(true);
        self.background_stopped.send_replace(true);
        for task in tasks {
            let _ = task.await;
        }
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    #[tokio::test(start_paused = true)]
    async fn drains_in_order_and_aborts_at_the_deadline() {
        let drain = Drain::default();
        let (request, draining) = (drain.requester(), drain.draining());
        let (inbound, abort, background, outbound) = (
            drain.inbound_stop(),
            drain.abort(),
            drain.background_stop(),
            drain.outbound_stop(),
        );
        let open = Arc::new(AtomicI64::new(2));
        let counted = open.clone();
        let run = tokio::spawn(drain.run(
            move || counted.load(Ordering::Relaxed),
            Duration::from_secs(30),
            vec![],
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !*inbound.borrow() && !draining.load(Ordering::Acquire),
            "not requested yet"
        );

        request.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(*inbound.borrow() && draining.load(Ordering::Acquire));
        assert!(
            !*abort.borrow() && !*background.borrow(),
            "connections are still open"
        );

        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(
            *abort.borrow() && *background.borrow(),
            "the deadline closes them"
        );
        assert!(!*outbound.borrow(), "outbound is never told to stop");
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stops_as_soon_as_the_last_connection_closes() {
        let drain = Drain::default();
        let request = drain.requester();
        let abort = drain.abort();
        let open = Arc::new(AtomicI64::new(1));
        let counted = open.clone();
        let run = tokio::spawn(drain.run(
            move || counted.load(Ordering::Relaxed),
            Duration::from_secs(30),
            vec![],
        ));
        request.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!*abort.borrow());
        open.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            *abort.borrow(),
            "closed within a check of the last connection ending"
        );
        run.await.unwrap();
    }
}
