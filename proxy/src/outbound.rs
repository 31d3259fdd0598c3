//! Outbound: the app's connections, captured by iptables. Meshed destinations get mTLS with
//! the identity the control plane announced; others pass through as plain TCP; a destination
//! the control plane cannot speak for is refused (fail closed, never plaintext by default).

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::tls::{MESH_ALPN, MESH_TUNNEL_ALPN};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::datapath::{DataPath, OpenConnection, connect};
use crate::mesh::{Answer, ServiceRoutes};
use crate::metrics::Direction;
use crate::relay::relay;
use crate::tls::handshake_failure_reason;

/// Where an outbound connection was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundTarget {
    /// `SO_ORIGINAL_DST`, or the socket's local address when the connection was not
    /// redirected (a client that connects to the destination's address directly).
    OriginalDst,
    /// Every connection goes to this address (tests and demos on loopback, no iptables).
    Fixed(SocketAddr),
}

/// What to do with a connection, given what the control plane said. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Mesh(SpiffeId),
    Passthrough,
    /// A Service address: balance over its endpoints.
    Service,
    Refuse(&'static str),
}

pub fn route(answer: Option<&Answer>) -> Route {
    match answer {
        None => Route::Refuse("destination_unknown"),
        Some(a) if a.service.is_some() => Route::Service,
        Some(d) if !d.meshed => Route::Passthrough,
        Some(d) => match &d.spiffe_id {
            Some(id) => Route::Mesh(id.clone()),
            None => Route::Refuse("meshed_without_identity"),
        },
    }
}

fn destination(stream: &TcpStream, target: OutboundTarget) -> std::io::Result<SocketAddr> {
    match target {
        OutboundTarget::Fixed(a) => Ok(a),
        OutboundTarget::OriginalDst => {
            let local = stream.local_addr()?;
            Ok(crate::orig_dst::original_dst(stream, local).unwrap_or(local))
        }
    }
}

/// Handles one captured connection.
pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    dp: Arc<DataPath>,
    target: OutboundTarget,
    listen: SocketAddr,
) {
    let _open = OpenConnection::new(dp.metrics.clone(), Direction::Outbound);
    let dst = match destination(&stream, target) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the connection's destination; closing");
            return;
        }
    };
    if dst.port() == listen.port() && (dst.ip() == listen.ip() || listen.ip().is_unspecified()) {
        dp.metrics.refused(Direction::Outbound, "loop");
        tracing::warn!(dst = %dst, "connection addressed to the outbound listener itself; closing");
        return;
    }
    tracing::trace!(app = %peer, dst = %dst, "outbound connection");
    let answer = dp.mesh.lookup(dst.ip(), dp.limits.destination_wait).await;
    match route(answer.as_deref()) {
        Route::Refuse(reason) => {
            dp.metrics.refused(Direction::Outbound, reason);
            tracing::warn!(dst = %dst, reason,
                "the control plane could not say whether the destination is meshed (or with which identity): refusing rather than sending plaintext");
        }
        Route::Passthrough => {
            if let Some(upstream) = connect_destination(&dp, dst).await {
                let relayed = relay(stream, upstream, dp.limits.idle_timeout).await;
                finish(&dp, relayed, dst);
            }
        }
        // Boxed: the handshake's state is freed once it is done instead of sizing every
        // connection's task for its whole life (the relay is what an idle connection holds).
        Route::Mesh(expected) => {
            match Box::pin(crate::tunnel::connect(&dp, dst, &expected)).await {
                Ok(upstream) => {
                    tracing::debug!(dst = %dst, peer.id = %expected, "mTLS established");
                    finish(&dp, relay_upstream(&dp, stream, upstream).await, dst);
                }
                Err(failure) => failure.count(&dp, dst, &expected),
            }
        }
        Route::Service => {
            if let Some(routes) = answer.as_deref().and_then(|a| a.service.as_ref()) {
                Box::pin(to_service(stream, &dp, dst, routes)).await;
            }
        }
    }
}

/// How many endpoints one connection to a Service tries before the app sees a failure.
pub const MAX_ENDPOINT_ATTEMPTS: usize = 3;

/// A connection to a Service address: connects straight to an endpoint chosen by the
/// balancer (mTLS to one with a proxy, verifying its own identity; plain TCP to one without),
/// trying another endpoint when a connect or handshake fails. Nothing has been read from the
/// app yet, so a retry never repeats bytes the app sent.
async fn to_service(stream: TcpStream, dp: &DataPath, dst: SocketAddr, routes: &ServiceRoutes) {
    let service = &*routes.name;
    let Some(targets) = routes.ports.get(&dst.port()) else {
        dp.metrics.service_connection(service, "unknown_port");
        tracing::warn!(dst = %dst, dst_service = service,
            "the Service has no such port: refusing (check the port the app calls against the Service's ports)");
        return;
    };
    if targets.is_empty() {
        dp.metrics.service_connection(service, "no_endpoints");
        tracing::warn!(dst = %dst, dst_service = service,
            "the Service has no ready endpoint for this port: refusing, as kube-proxy does (check that its pods are ready and its selector picks them)");
        return;
    }
    let mut tried: Vec<SocketAddr> = Vec::new();
    while tried.len() < MAX_ENDPOINT_ATTEMPTS {
        let Some(target) = dp.balancer.pick(targets, &tried) else {
            break;
        };
        dp.metrics
            .balancer_pick(service, if tried.is_empty() { "first" } else { "retry" });
        tried.push(target.addr);
        let lease = dp.balancer.lease(target.addr);
        match &target.identity {
            Some(expected) => {
                match Box::pin(crate::tunnel::connect(dp, target.addr, expected)).await {
                    Ok(upstream) => {
                        tracing::debug!(dst = %dst, dst_service = service, endpoint = %target.addr, peer.id = %expected, "mTLS established");
                        dp.metrics.service_connection(service, "mtls");
                        let endpoint = lease.addr();
                        finish(dp, relay_upstream(dp, stream, upstream).await, endpoint);
                        drop(lease);
                        return;
                    }
                    Err(failure) => {
                        failure.count(dp, target.addr, expected);
                        if !failure.retry {
                            break;
                        }
                        dp.metrics.endpoint_failure(service, failure.reason);
                    }
                }
            }
            None => match connect(target.addr, dp.limits.connect_timeout).await {
                Ok(upstream) => {
                    tracing::debug!(dst = %dst, dst_service = service, endpoint = %target.addr, "endpoint without a proxy: plain TCP");
                    return carry(dp, stream, upstream, service, "plaintext", lease).await;
                }
                Err(e) => {
                    tracing::debug!(endpoint = %target.addr, dst_service = service, error = %e, "connect failed");
                    dp.metrics
                        .endpoint_failure(service, connect_failure_reason(&e));
                }
            },
        }
        dp.balancer.failed(target.addr);
        drop(lease);
        if tried.len() < targets.len().min(MAX_ENDPOINT_ATTEMPTS) {
            tracing::info!(endpoint = %target.addr, dst_service = service, "endpoint failed before any byte was sent; trying another");
        }
    }
    dp.metrics.service_connection(service, "failed");
    tracing::warn!(dst = %dst, dst_service = service, tried = ?tried,
        "no endpoint of the Service could be reached: closing the app's connection");
}

/// Relays the app's connection over a tunnel stream or its own TLS connection.
async fn relay_upstream(
    dp: &DataPath,
    app: TcpStream,
    upstream: crate::tunnel::Upstream,
) -> crate::relay::Relayed {
    match upstream {
        crate::tunnel::Upstream::Stream(s) => {
            crate::tunnel::relay_app(app, s, dp.limits.idle_timeout).await
        }
        crate::tunnel::Upstream::Tls(tls) => relay(app, tls, dp.limits.idle_timeout).await,
    }
}

/// Relays the app's connection to the endpoint it was given, counted as `outcome` for the
/// Service and against the endpoint's lease until it ends.
async fn carry<U>(
    dp: &DataPath,
    app: TcpStream,
    upstream: U,
    service: &str,
    outcome: &'static str,
    lease: crate::balance::Lease,
) where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    dp.metrics.service_connection(service, outcome);
    let endpoint = lease.addr();
    finish(
        dp,
        relay(app, upstream, dp.limits.idle_timeout).await,
        endpoint,
    );
    drop(lease);
}

fn connect_failure_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect_refused",
        std::io::ErrorKind::TimedOut => "connect_timeout",
        _ => "connect_error",
    }
}

/// Connects to `dst`; a failure is counted and logged.
async fn connect_destination(dp: &DataPath, dst: SocketAddr) -> Option<TcpStream> {
    match connect(dst, dp.limits.connect_timeout).await {
        Ok(s) => Some(s),
        Err(e) => {
            dp.metrics.refused(Direction::Outbound, "connect_failed");
            tracing::debug!(dst = %dst, error = %e, "connect failed");
            None
        }
    }
}

/// Why mTLS could not be originated, and whether another endpoint may be tried.
#[derive(Debug, Clone, Copy)]
pub struct OriginateFailure {
    pub reason: &'static str,
    /// True when the failure belongs to the endpoint (refused, timed out, a failed handshake),
    /// false when it is this proxy's own (no certificate).
    pub retry: bool,
    /// Already counted and logged (connect failures are counted by `connect_destination`).
    handshake: bool,
}

impl OriginateFailure {
    /// A failure already counted and logged where it happened.
    pub(crate) fn new(reason: &'static str, retry: bool) -> Self {
        OriginateFailure {
            reason,
            retry,
            handshake: false,
        }
    }

    fn count(&self, dp: &DataPath, dst: SocketAddr, expected: &SpiffeId) {
        if self.handshake {
            dp.metrics
                .handshake_failed(Direction::Outbound, self.reason);
            tracing::warn!(dst = %dst, expected = %expected, reason = self.reason, "mTLS handshake failed; refusing");
        }
    }
}

/// Originates mTLS to `dst`, presenting our certificate and requiring `expected`'s, with ALPN
/// `palisade-tunnel/1` (when tunnels are on) or `palisade/1`. Every refusal is counted and
/// logged; nothing is sent in plaintext.
pub(crate) async fn originate_mesh(
    dp: &DataPath,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, OriginateFailure> {
    let own = |reason| OriginateFailure {
        reason,
        retry: false,
        handshake: false,
    };
    if dp.store.valid().is_none() {
        dp.metrics.refused(Direction::Outbound, "no_certificate");
        tracing::warn!(dst = %dst, "no valid certificate: cannot originate mTLS; refusing");
        return Err(own("no_certificate"));
    }
    let config = match dp.client_configs.for_identity(expected) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the client TLS config");
            return Err(own("client_config"));
        }
    };
    let tcp = match connect(dst, dp.limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            dp.metrics.refused(Direction::Outbound, "connect_failed");
            tracing::debug!(dst = %dst, error = %e, "connect failed");
            return Err(OriginateFailure {
                reason: connect_failure_reason(&e),
                retry: true,
                handshake: false,
            });
        }
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = tokio::time::timeout(
        dp.limits.handshake_timeout,
        connector.connect(ServerName::IpAddress(dst.ip().into()), tcp),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let failed = |reason| OriginateFailure {
        reason,
        retry: true,
        handshake: true,
    };
    let tls = match handshake {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(dst = %dst, error = %e, "mTLS handshake error");
            return Err(failed(handshake_failure_reason(&e)));
        }
    };
    let alpn = tls.get_ref().1.alpn_protocol();
    if alpn != Some(MESH_ALPN) && alpn != Some(MESH_TUNNEL_ALPN) {
        return Err(failed("no_alpn"));
    }
    Ok(tls)
}

fn finish(dp: &DataPath, relayed: crate::relay::Relayed, dst: SocketAddr) {
    let crate::relay::Relayed { up, down, result } = relayed;
    dp.metrics.bytes(Direction::Outbound, "to_upstream", up);
    dp.metrics.bytes(Direction::Outbound, "to_downstream", down);
    match result {
        Ok(()) => {}
        Err(e) => match refused_after_handshake(&e, down) {
            // TLS 1.3: the server checks our certificate after the client's side of the
            // handshake is done, so its refusal arrives as an alert on the first read. Without
            // this, the app's request fails and the proxy says nothing.
            Some(alert) => {
                dp.metrics
                    .handshake_failed(Direction::Outbound, "peer_refused_certificate");
                tracing::warn!(dst = %dst, alert = %alert,
                    "the destination refused this proxy's certificate: it does not trust the mesh root or admit this identity (check its trust bundle)");
            }
            None => tracing::debug!(dst = %dst, error = %e, "outbound connection ended"),
        },
    }
}

/// The TLS alert a destination sent before any byte came back, if that is how the relay ended.
fn refused_after_handshake(error: &crate::relay::RelayError, down: u64) -> Option<String> {
    let crate::relay::RelayError::Io(e) = error else {
        return None;
    };
    if down > 0 {
        return None;
    }
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(format!("{alert:?}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(meshed: bool, id: Option<&str>) -> Answer {
        palisade_ca_api::wire::Destination {
            address: "10.77.0.2".parse().unwrap(),
            meshed,
            spiffe_id: id.map(|s| s.parse().unwrap()),
            workload: None,
            service: None,
        }
        .into()
    }

    #[test]
    fn routes_fail_closed() {
        assert_eq!(route(None), Route::Refuse("destination_unknown"));
        assert_eq!(route(Some(&dest(false, None))), Route::Passthrough);
        assert_eq!(
            route(Some(&dest(true, None))),
            Route::Refuse("meshed_without_identity")
        );
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert_eq!(
            route(Some(&dest(true, Some(id)))),
            Route::Mesh(id.parse().unwrap())
        );
        let service = palisade_ca_api::wire::Destination {
            service: Some(palisade_ca_api::wire::ServiceAnswer {
                name: "shop/api".into(),
                ports: vec![80],
                endpoints: vec![],
                total_endpoints: 0,
            }),
            ..palisade_ca_api::wire::Destination::unmeshed("10.96.0.10".parse().unwrap())
        };
        assert_eq!(route(Some(&service.into())), Route::Service);
    }
}
