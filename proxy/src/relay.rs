//! Relaying bytes between two streams: half-close passed on, both sides closed when one
//! fails, an idle timeout, bounded buffers, byte counts.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Buffer per direction: bounded, and small enough for many idle connections (two per
/// connection; 8 KiB keeps an idle connection under the 30 KiB budget, see docs/proxy.md).
const BUFFER: usize = 8 * 1024;

/// Bytes moved and when the last one moved, shared by both directions.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Wraps a stream to record activity on every read and write.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for {0:?}: closed")]
    Idle(Duration),
    #[error("relay failed: {0}")]
    Io(#[from] io::Error),
}

/// Moves bytes both ways until both sides are done, one fails, or nothing moves for `idle`.
/// Returns (bytes from `downstream` to `upstream`, bytes back). Both streams are dropped,
/// and so closed, when this returns.
pub async fn relay<A, B>(
    downstream: A,
    upstream: B,
    idle: Duration,
) -> Result<(u64, u64), RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let mut a = Tracked {
        inner: downstream,
        activity: activity.clone(),
    };
    let mut b = Tracked {
        inner: upstream,
        activity: activity.clone(),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER);
    tokio::pin!(copy);
    loop {
        let wait = idle.saturating_sub(activity.idle_for());
        tokio::select! {
            result = &mut copy => return result.map_err(RelayError::Io),
            _ = tokio::time::sleep(wait) => {
                if activity.idle_for() >= idle {
                    return Err(RelayError::Idle(idle));
                }
            }
        }
    }
}
