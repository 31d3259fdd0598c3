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

/// Each direction starts with a small buffer, and moves to a large one after a few reads that
/// fill it (bulk transfers); both are bounded. The small one is released whenever the read
/// side has nothing more and all it held is written, so that an idle connection holds no
/// relay buffer at all (10,000 idle connections: 4 KiB less each, per proxy); the large one
/// is kept, as a bulk transfer waits for reads all the time.
const SMALL_BUFFER: usize = 2 * 1024;
const LARGE_BUFFER: usize = 16 * 1024;
/// Consecutive full reads before the buffer grows.
const FULL_READS_TO_GROW: u32 = 2;

/// Bytes moved and when the last one moved, shared by both directions.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

/// Bytes read from one side.
#[derive(Debug, Default)]
struct Count(AtomicU64);

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

/// Wraps a stream to record activity on every read and write, and count what it reads.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    read: Count,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.touch();
            self.read.0.fetch_add(n as u64, Ordering::Relaxed);
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

/// How a relay ended: bytes each way (counted even when it failed) and why it stopped.
#[derive(Debug)]
pub struct Relayed {
    /// From the downstream (accepted) side to the upstream.
    pub up: u64,
    /// Back to the downstream side.
    pub down: u64,
    pub result: Result<(), RelayError>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for {0:?}: closed")]
    Idle(Duration),
    #[error("relay failed: {0}")]
    Io(#[from] io::Error),
}

/// Moves bytes both ways until both sides are done, one fails, or nothing moves for `idle`.
/// Both streams are dropped, and so closed, when this returns.
pub async fn relay<A, B>(downstream: A, upstream: B, idle: Duration) -> Relayed
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
        read: Count::default(),
    };
    let mut b = Tracked {
        inner: upstream,
        activity: activity.clone(),
        read: Count::default(),
    };
    let result = {
        let copy = copy_both_ways(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            let wait = idle.saturating_sub(activity.idle_for());
            tokio::select! {
                result = &mut copy => break result.map_err(RelayError::Io),
                _ = tokio::time::sleep(wait) => {
                    if activity.idle_for() >= idle {
                        break Err(RelayError::Idle(idle));
                    }
                }
            }
        }
    };
    Relayed {
        up: a.read.0.load(Ordering::Relaxed),
        down: b.read.0.load(Ordering::Relaxed),
        result,
    }
}

/// One direction of a relay: read into the buffer, write it all out, pass EOF on as a
/// half-close.
#[derive(Debug, Default)]
struct Half {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    full_reads: u32,
    read_done: bool,
    done: bool,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.pos == self.filled && !self.read_done {
                if self.buf.is_empty() {
                    self.buf = vec![0; SMALL_BUFFER];
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.buf.len() == SMALL_BUFFER {
                            self.buf = Vec::new();
                        }
                        // Nothing to read: make sure what was written reaches the peer.
                        std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.pos = 0;
                        self.filled = n;
                        if n == 0 {
                            self.read_done = true;
                        } else if n == self.buf.len() && self.buf.len() < LARGE_BUFFER {
                            self.full_reads += 1;
                            if self.full_reads >= FULL_READS_TO_GROW {
                                let mut large = vec![0; LARGE_BUFFER];
                                large[..n].copy_from_slice(&self.buf[..n]);
                                self.buf = large;
                            }
                        } else {
                            self.full_reads = 0;
                        }
                    }
                }
            }
            while self.pos < self.filled {
                let n = std::task::ready!(
                    Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
            }
            if self.read_done && self.pos == self.filled {
                std::task::ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways until both directions have seen EOF (each passed on as a half-close), or
/// either fails.
async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    std::future::poll_fn(|cx| {
        if !a_to_b.done
            && let Poll::Ready(Err(e)) = a_to_b.poll_copy(cx, a, b)
        {
            return Poll::Ready(Err(e));
        }
        if !b_to_a.done
            && let Poll::Ready(Err(e)) = b_to_a.poll_copy(cx, b, a)
        {
            return Poll::Ready(Err(e));
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bulk_grows_the_buffer_and_half_close_passes_both_ways() {
        let (mut client, proxy_down) = tokio::io::duplex(64 * 1024);
        let (proxy_up, mut server) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(relay(proxy_down, proxy_up, Duration::from_secs(30)));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let r = relay.await.unwrap();
        assert!(r.result.is_ok());
        assert_eq!((r.up, r.down), (300_000, 4));
    }

    #[tokio::test]
    async fn a_quiet_direction_holds_no_buffer_and_a_bulk_one_keeps_its_large_one() {
        let (mut app, mut reader) = tokio::io::duplex(64 * 1024);
        let (mut writer, mut peer) = tokio::io::duplex(64 * 1024);
        let mut half = Half::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(
            half.poll_copy(&mut cx, &mut reader, &mut writer)
                .is_pending()
        );
        let mut got = [0u8; 18];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(half.buf.capacity(), 0, "an idle direction keeps its buffer");
        // Reads that fill the buffer grow it; the large one stays between reads.
        app.write_all(&[7u8; 3 * SMALL_BUFFER]).await.unwrap();
        assert!(
            half.poll_copy(&mut cx, &mut reader, &mut writer)
                .is_pending()
        );
        assert_eq!(half.buf.len(), LARGE_BUFFER);
        let mut bulk = vec![0u8; 3 * SMALL_BUFFER];
        peer.read_exact(&mut bulk).await.unwrap();
        assert!(bulk.iter().all(|b| *b == 7));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_moving_for_the_idle_timeout_ends_the_relay() {
        let (_client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, _server) = tokio::io::duplex(1024);
        let r = relay(proxy_down, proxy_up, Duration::from_secs(5)).await;
        assert!(matches!(r.result, Err(RelayError::Idle(_))));
    }
}
