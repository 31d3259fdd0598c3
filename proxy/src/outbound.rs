//! Outbound: the app's connections, captured by iptables. Meshed destinations get mTLS with
//! the identity the control plane announced; others pass through as plain TCP; a destination
//! the control plane cannot speak for is refused (fail closed, never plaintext by default).

use std::net::SocketAddr;
use std::sync::Arc;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::tls::MESH_ALPN;
use palisade_ca_api::wire::Destination;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::datapath::{DataPath, OpenConnection, connect};
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
    Refuse(&'static str),
}

pub fn route(answer: Option<&Destination>) -> Route {
    match answer {
        None => Route::Refuse("destination_unknown"),
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
    match route(answer.as_ref()) {
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
        Route::Mesh(expected) => {
            if let Some(tls) = originate_mesh(&dp, dst, &expected).await {
                tracing::debug!(dst = %dst, peer.id = %expected, "mTLS established");
                finish(&dp, relay(stream, tls, dp.limits.idle_timeout).await, dst);
            }
        }
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

/// Originates mTLS to `dst`, presenting our certificate and requiring `expected`'s, with ALPN
/// `palisade/1`. Every refusal is counted and logged; nothing is sent in plaintext.
async fn originate_mesh(
    dp: &DataPath,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    if dp.store.valid().is_none() {
        dp.metrics.refused(Direction::Outbound, "no_certificate");
        tracing::warn!(dst = %dst, "no valid certificate: cannot originate mTLS; refusing");
        return None;
    }
    let config = match dp.client_configs.for_identity(expected) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the client TLS config");
            return None;
        }
    };
    let tcp = connect_destination(dp, dst).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = tokio::time::timeout(
        dp.limits.handshake_timeout,
        connector.connect(ServerName::IpAddress(dst.ip().into()), tcp),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let tls = match handshake {
        Ok(t) => t,
        Err(e) => {
            let reason = handshake_failure_reason(&e);
            dp.metrics.handshake_failed(Direction::Outbound, reason);
            tracing::warn!(dst = %dst, expected = %expected, reason, error = %e, "mTLS handshake failed; refusing");
            return None;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(MESH_ALPN) {
        dp.metrics.handshake_failed(Direction::Outbound, "no_alpn");
        tracing::warn!(dst = %dst, "the destination did not agree to palisade/1; refusing");
        return None;
    }
    Some(tls)
}

fn finish(dp: &DataPath, relayed: crate::relay::Relayed, dst: SocketAddr) {
    let crate::relay::Relayed { up, down, result } = relayed;
    dp.metrics.bytes(Direction::Outbound, "to_upstream", up);
    dp.metrics.bytes(Direction::Outbound, "to_downstream", down);
    if let Err(e) = result {
        tracing::debug!(dst = %dst, error = %e, "outbound connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(meshed: bool, id: Option<&str>) -> Destination {
        Destination {
            address: "10.77.0.2".parse().unwrap(),
            meshed,
            spiffe_id: id.map(|s| s.parse().unwrap()),
            workload: None,
            service: None,
        }
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
    }
}
