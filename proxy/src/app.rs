//! Wiring: bind the listeners, start the tasks, and drain on shutdown. `start` returns the
//! real addresses so tests bind on port 0.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::datapath::{DataPath, Limits, accept_loop};
use crate::drain::Drain;
use crate::identity::{CertStore, Identity, run_rotation, watch_anchors};
use crate::inbound::{self, InboundTarget};
use crate::mesh::{MeshView, run_watch};
use crate::metrics::{Direction, Metrics};
use crate::outbound::{self, OutboundTarget};
use crate::probes::AppProbes;
use crate::source::MeshWatcher;
use crate::tls::{TlsError, TrustBundle};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {1} ({0}): {2}")]
    Bind(&'static str, SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Where to listen and how to behave.
#[derive(Debug, Clone)]
pub struct Settings {
    pub inbound_listen: SocketAddr,
    pub outbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub inbound_target: InboundTarget,
    pub outbound_target: OutboundTarget,
    pub limits: Limits,
    pub drain_timeout: Duration,
    pub probes: AppProbes,
    pub probe_timeout: Duration,
    /// `/metrics` answers callers other than loopback.
    pub admin_remote_metrics: bool,
    /// What `init` did about capture (one line per family), shown on `/ready`.
    pub init_report: String,
}

/// The components, built by the caller (from the config in production, by hand in tests).
pub struct Parts {
    pub store: Arc<CertStore>,
    pub bundle: Arc<TrustBundle>,
    pub mesh: Arc<MeshView>,
    pub metrics: Arc<Metrics>,
    /// Runs the rotation task when present.
    pub identity: Option<Arc<Identity>>,
    /// Follows the mesh watch when present.
    pub mesh_watcher: Option<Arc<dyn MeshWatcher>>,
}

/// A running proxy.
pub struct Bound {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub data_path: Arc<DataPath>,
    shutdown: watch::Sender<bool>,
    done: JoinHandle<()>,
}

impl Bound {
    /// Starts the drain (as SIGTERM and `POST /shutdown` do).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Waits until the proxy has drained and stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Binds `addr` and reads back the address the kernel gave (port 0 in tests).
async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let bind_error = |e| AppError::Bind(what, addr, e);
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// The IPv6 twin of a listener on the IPv4 wildcard or loopback (the defaults): `[::]` or
/// `[::1]`, same port. None for any other address: an explicit one is taken as meant. Pure.
pub fn ipv6_twin(bound: SocketAddr) -> Option<SocketAddr> {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Some((Ipv6Addr::UNSPECIFIED, bound.port()).into()),
        IpAddr::V4(ip) if ip.is_loopback() => Some((Ipv6Addr::LOCALHOST, bound.port()).into()),
        _ => None,
    }
}

/// Binds the IPv6 twin of `bound` (IPv6 only, so the IPv4 listener keeps its own traffic).
/// In a pod without IPv6 there is nothing to bind, and nothing to serve: `None`, logged. A
/// twin that cannot be bound otherwise is logged too; redirected IPv6 connections then find
/// no listener and are refused, never let through.
fn bind_twin(what: &'static str, bound: SocketAddr) -> Option<(TcpListener, SocketAddr)> {
    let addr = ipv6_twin(bound)?;
    let attempt = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    match attempt() {
        Ok(listener) => Some((listener, addr)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            tracing::info!(listener = what, %addr, "no IPv6 in this pod; listening on IPv4 only");
            None
        }
        Err(e) => {
            tracing::warn!(listener = what, %addr, error = %e, "cannot listen on IPv6; IPv6 connections to this listener are refused");
            None
        }
    }
}

/// Binds everything and starts the tasks.
pub async fn start(settings: Settings, parts: Parts) -> Result<Bound, AppError> {
    let (inbound_l, inbound_addr) = bind("inbound", settings.inbound_listen).await?;
    let (outbound_l, outbound_addr) = bind("outbound", settings.outbound_listen).await?;
    let (admin_l, admin_addr) = bind("admin", settings.admin_listen).await?;
    let inbound6 = bind_twin("inbound", inbound_addr);
    let outbound6 = bind_twin("outbound", outbound_addr);
    let admin6 = bind_twin("admin", admin_addr);

    let dp = Arc::new(DataPath::new(
        parts.store.clone(),
        parts.bundle.clone(),
        parts.mesh.clone(),
        parts.metrics.clone(),
        settings.limits.clone(),
    )?);

    let drain = Drain::default();
    let mut tasks = Vec::new();
    // One loop per direction over both families, so that the connection caps hold for the
    // pod, not per family.
    let in_target = settings.inbound_target;
    let inbound_ls = std::iter::once(inbound_l).chain(inbound6.map(|(l, _)| l));
    tasks.push(tokio::spawn(accept_loop(
        inbound_ls.collect(),
        Direction::Inbound,
        dp.clone(),
        drain.inbound_stop(),
        drain.abort(),
        move |s, peer, dp| inbound::handle(s, peer, dp, in_target.clone()),
    )));
    let out_target = settings.outbound_target;
    let (outbound_ls, out_listens): (Vec<_>, Vec<_>) = std::iter::once((outbound_l, outbound_addr))
        .chain(outbound6)
        .unzip();
    tasks.push(tokio::spawn(accept_loop(
        outbound_ls,
        Direction::Outbound,
        dp.clone(),
        drain.outbound_stop(),
        drain.abort(),
        move |s, peer, dp| {
            // The listener it came in on is the one of the caller's family.
            let listen = out_listens
                .iter()
                .copied()
                .find(|l| l.is_ipv4() == peer.is_ipv4())
                .unwrap_or(out_listens[0]);
            outbound::handle(s, peer, dp, out_target, listen)
        },
    )));
    if let Some(identity) = parts.identity.clone() {
        if let Some(anchors) = identity.config.trust_anchors.clone() {
            tasks.push(tokio::spawn(watch_anchors(
                anchors,
                identity.clone(),
                drain.background_stop(),
            )));
        }
        tasks.push(tokio::spawn(run_rotation(
            identity,
            drain.background_stop(),
        )));
    }
    if let Some(source) = parts.mesh_watcher.clone() {
        tasks.push(tokio::spawn(run_watch(
            parts.mesh.clone(),
            source,
            drain.background_stop(),
        )));
    }
    let admin_state = Arc::new(AdminState {
        store: parts.store.clone(),
        bundle: parts.bundle.clone(),
        mesh: parts.mesh.clone(),
        metrics: parts.metrics.clone(),
        probes: settings.probes.clone(),
        probe_timeout: settings.probe_timeout,
        draining: drain.draining(),
        shutdown: drain.requester(),
        remote_metrics: settings.admin_remote_metrics,
        init_report: settings.init_report.clone(),
    });
    for listener in std::iter::once(admin_l).chain(admin6.map(|(l, _)| l)) {
        tasks.push(tokio::spawn(admin::serve(
            listener,
            admin_state.clone(),
            drain.background_stop(),
        )));
    }

    let shutdown_tx = drain.requester();
    let metrics = parts.metrics.clone();
    let open_connections =
        move || metrics.active(Direction::Inbound) + metrics.active(Direction::Outbound);
    let done = tokio::spawn(drain.run(open_connections, settings.drain_timeout, tasks));

    Ok(Bound {
        inbound: inbound_addr,
        outbound: outbound_addr,
        admin: admin_addr,
        data_path: dp,
        shutdown: shutdown_tx,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_listeners_have_ipv6_twins_and_explicit_ones_do_not() {
        let twin = |a: &str| ipv6_twin(a.parse().unwrap()).map(|t| t.to_string());
        assert_eq!(twin("0.0.0.0:15006").as_deref(), Some("[::]:15006"));
        assert_eq!(twin("127.0.0.1:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(twin("10.77.0.3:15006"), None);
        assert_eq!(twin("[::]:15006"), None);
    }
}
