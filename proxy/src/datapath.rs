//! What both listeners share, and the accept loop they both use.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::balance::Balancer;
use crate::denial_log::{DenialLog, LogThrottle};
use crate::identity::CertStore;
use crate::mesh::MeshView;
use crate::metrics::{Direction, Metrics};
use crate::tls::{ClientConfigs, TrustBundle};

/// Timeouts and caps of the data path.
#[derive(Debug, Clone)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long the inbound side peeks for a ClientHello.
    pub detect_window: Duration,
    /// How long the outbound side waits for the control plane's first word on a destination.
    pub destination_wait: Duration,
    /// Concurrent connections per direction.
    pub max_connections: usize,
    /// Concurrent inbound connections from one source address, so that one hostile or broken
    /// caller (stalled ClientHellos, say) cannot fill the inbound cap for everyone else.
    pub max_connections_per_source: usize,
    /// Pooled HTTP/2 tunnels between proxies (`PALISADE_TUNNELS`); off: one TLS connection per
    /// app connection.
    pub tunnels: bool,
    /// An inbound tunnel that carries no stream for this long is closed (GOAWAY), so that a
    /// caller cannot hold a connection slot with an empty tunnel; callers close theirs sooner
    /// ([`crate::tunnel::IDLE_TUNNEL`]).
    pub tunnel_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            detect_window: Duration::from_millis(200),
            destination_wait: Duration::from_secs(2),
            max_connections: 8192,
            max_connections_per_source: 1024,
            tunnels: true,
            tunnel_idle_timeout: 2 * crate::tunnel::IDLE_TUNNEL,
        }
    }
}

/// Shared state of the data path: built once, read by every connection.
pub struct DataPath {
    pub store: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub server_config: Arc<ServerConfig>,
    pub client_configs: ClientConfigs,
    pub mesh: Arc<MeshView>,
    pub metrics: Arc<Metrics>,
    pub denials: DenialLog,
    pub balancer: Arc<Balancer>,
    pub limits: Limits,
    /// Outbound tunnels to other proxies, by destination and identity.
    pub tunnels: crate::tunnel::Pool,
    /// Connection slots per direction, and inbound per source: taken by every accepted
    /// connection and by every stream of an inbound tunnel.
    pub slots: [Arc<Semaphore>; 2],
    pub sources: SourceCounts,
    /// Turns true when the inbound listener stops accepting (drain): open tunnels are told
    /// to take no new stream (GOAWAY) so that they close with their last one.
    pub inbound_draining: watch::Sender<bool>,
}

impl DataPath {
    pub fn new(
        store: Arc<CertStore>,
        bundle: Arc<TrustBundle>,
        mesh: Arc<MeshView>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Result<Self, crate::tls::TlsError> {
        Ok(DataPath {
            server_config: crate::tls::server_config(
                store.clone(),
                bundle.clone(),
                limits.tunnels,
            )?,
            client_configs: ClientConfigs::new(store.clone(), bundle.clone(), limits.tunnels),
            tunnels: crate::tunnel::Pool::default(),
            slots: [
                Arc::new(Semaphore::new(limits.max_connections)),
                Arc::new(Semaphore::new(limits.max_connections)),
            ],
            sources: SourceCounts::new(limits.max_connections_per_source),
            inbound_draining: watch::Sender::new(false),
            store,
            bundle,
            mesh,
            metrics,
            denials: DenialLog::default(),
            balancer: Balancer::new(),
            limits,
        })
    }
}

/// Counts a connection closed when dropped.
pub struct OpenConnection {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl OpenConnection {
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        metrics.connection_opened(direction);
        OpenConnection { metrics, direction }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.direction);
    }
}

/// Connects with a timeout and TCP_NODELAY.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepts on `listeners` (one direction: its IPv4 listener and, in a pod with IPv6, its IPv6
/// twin) until `stop_accepting` turns true, each connection handled in a task this loop owns,
/// at most `limits.max_connections` at once over all of them (and per source). Then waits for
/// the open connections to end, or aborts them when `abort` turns true.
pub async fn accept_loop<F, Fut>(
    listeners: Vec<TcpListener>,
    direction: Direction,
    data_path: Arc<DataPath>,
    mut stop_accepting: watch::Receiver<bool>,
    mut abort: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<DataPath>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = data_path.limits.max_connections;
    let slots = data_path.slots[direction as usize].clone();
    let limit_log = LogThrottle::new(1, 1);
    // Only inbound callers are told apart: outbound ones are all the pod's own app.
    let sources = (direction == Direction::Inbound).then_some(&data_path.sources);
    let source_log = LogThrottle::new(1, 1);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept_any(&listeners) => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: wait a little rather than spin.
                        tracing::warn!(direction = direction.as_str(), error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    data_path.metrics.refused(direction, "connection_limit");
                    if let Some(suppressed) = limit_log.admit() {
                        tracing::warn!(direction = direction.as_str(), limit = max, peer = %peer, suppressed_since_last = suppressed,
                            "connection limit reached: refusing new connections until some close (PALISADE_MAX_CONNECTIONS)");
                    }
                    drop(stream);
                    continue;
                };
                let source = match &sources {
                    None => None,
                    Some(counts) => match counts.admit(peer.ip()) {
                        Some(held) => Some(held),
                        None => {
                            data_path.metrics.refused(direction, "source_connection_limit");
                            if let Some(suppressed) = source_log.admit() {
                                tracing::warn!(direction = direction.as_str(), limit = counts.cap, peer = %peer, suppressed_since_last = suppressed,
                                    "one source holds as many connections as it may: refusing its new ones until some close (PALISADE_MAX_CONNECTIONS_PER_SOURCE)");
                            }
                            drop(stream);
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let span = tracing::info_span!("conn", direction = direction.as_str(), peer.ip = %peer.ip(), peer.port = peer.port());
                let fut = handle(stream, peer, data_path.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let _source = source;
                    fut.await;
                }.instrument(span));
                while tasks.try_join_next().is_some() {}
            }
            // A finished connection's task is freed as it ends, not at the next accept: after
            // a burst, thousands of them would otherwise hold their memory (3-7 KiB each).
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = until_true(&mut stop_accepting) => break,
            _ = until_true(&mut abort) => break,
        }
    }
    drop(listeners);
    if direction == Direction::Inbound {
        data_path.inbound_draining.send_replace(true);
    }
    tokio::select! {
        _ = until_true(&mut abort) => tasks.abort_all(),
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
}

/// The next connection on any of `listeners`.
async fn accept_any(listeners: &[TcpListener]) -> std::io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for listener in listeners {
            if let std::task::Poll::Ready(accepted) = listener.poll_accept(cx) {
                return std::task::Poll::Ready(accepted);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Open connections per source address, at most `cap` each; holds only sources with open
/// connections.
pub struct SourceCounts {
    pub cap: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One connection counted against its source until dropped.
pub struct SourceHeld {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl SourceCounts {
    fn new(cap: usize) -> Self {
        SourceCounts {
            cap: cap.max(1),
            open: Default::default(),
        }
    }

    pub fn admit(&self, ip: std::net::IpAddr) -> Option<SourceHeld> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceHeld {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for SourceHeld {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone); holds no borrow across awaits.
pub use palisade_plumbing::until_true;
