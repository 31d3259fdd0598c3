//! Relaying between a TCP connection and one HTTP/2 stream: the app's EOF becomes END_STREAM,
//! the peer's END_STREAM a half-close towards the app, a reset closes both; h2 flow control
//! is honoured both ways; an idle timeout; byte counts. An idle stream holds no buffer: each
//! read allocates its own and hands it to h2 without a copy.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::relay::RelayError;

/// The first read of a burst is small, so that chatty connections stay cheap; reads that
/// fill the buffer double it, up to the larger size, for bulk transfers.
const FIRST_READ: usize = 4 * 1024;
const LARGEST_READ: usize = 64 * 1024;

/// Bytes moved each way and how the relay ended.
#[derive(Debug)]
pub struct Moved {
    /// Read from the TCP side, sent on the stream.
    pub from_tcp: u64,
    /// Received on the stream, written to the TCP side.
    pub from_stream: u64,
    pub result: Result<(), RelayError>,
}

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

/// Moves bytes both ways until both directions ended, either failed, or nothing moved for
/// `idle`. The TCP connection and the stream are closed when this returns (an unfinished
/// stream is reset by h2 when its handles drop).
pub async fn relay(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    idle: Duration,
) -> Moved {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (from_tcp, from_stream) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = {
        let both = async {
            tokio::try_join!(
                tcp_to_stream(&tcp, send, &activity, &from_tcp),
                stream_to_tcp(recv, &tcp, &activity, &from_stream),
            )
        };
        tokio::pin!(both);
        loop {
            let wait = idle.saturating_sub(activity.idle_for());
            tokio::select! {
                r = &mut both => break r.map(|_| ()).map_err(RelayError::Io),
                _ = tokio::time::sleep(wait) => {
                    if activity.idle_for() >= idle {
                        break Err(RelayError::Idle(idle));
                    }
                }
            }
        }
    };
    Moved {
        from_tcp: from_tcp.load(Ordering::Relaxed),
        from_stream: from_stream.load(Ordering::Relaxed),
        result,
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

async fn tcp_to_stream(
    tcp: &TcpStream,
    mut send: SendStream<Bytes>,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut size = FIRST_READ;
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        activity.touch();
        count.fetch_add(n as u64, Ordering::Relaxed);
        size = if n == size {
            (size * 2).min(LARGEST_READ)
        } else {
            FIRST_READ
        };
        let mut data = buf.freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = capacity(&mut send).await?;
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

/// Waits until h2 lets the stream send at least one byte.
async fn capacity(send: &mut SendStream<Bytes>) -> io::Result<usize> {
    loop {
        let now = send.capacity();
        if now > 0 {
            return Ok(now);
        }
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

async fn stream_to_tcp(
    mut recv: RecvStream,
    tcp: &TcpStream,
    activity: &Activity,
    count: &AtomicU64,
) -> io::Result<()> {
    use futures_util::FutureExt as _;
    loop {
        let mut ended = false;
        let data = match recv.data().await {
            None => {
                // The peer's END_STREAM: a half-close towards the app.
                let _ = socket2::SockRef::from(tcp).shutdown(Shutdown::Write);
                return Ok(());
            }
            Some(Err(e)) => return Err(h2_io(e)),
            Some(Ok(data)) => data,
        };
        // Frames already received go out in one write: DATA frames are at most 16 KiB, and a
        // write per frame would cost a system call each during bulk transfers.
        let data = if data.len() < LARGEST_READ {
            let mut batch: Option<BytesMut> = None;
            while batch.as_ref().map_or(data.len(), |b| b.len()) < LARGEST_READ {
                match recv.data().now_or_never() {
                    Some(Some(Ok(more))) => batch
                        .get_or_insert_with(|| BytesMut::from(&data[..]))
                        .extend_from_slice(&more),
                    Some(Some(Err(e))) => return Err(h2_io(e)),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            batch.map_or(data, BytesMut::freeze)
        } else {
            data
        };
        let n = data.len();
        activity.touch();
        count.fetch_add(n as u64, Ordering::Relaxed);
        let mut written = 0;
        while written < n {
            tcp.writable().await?;
            match tcp.try_write(&data[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => {
                    written += w;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        // Only now may the peer send more: the window tracks what the app has taken.
        let _ = recv.flow_control().release_capacity(n);
        if ended {
            let _ = socket2::SockRef::from(tcp).shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}
