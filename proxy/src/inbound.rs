//! Inbound: connections to this workload, captured by iptables. A mesh caller (TLS with ALPN
//! `palisade-tunnel/1` or `palisade/1`) is authenticated by its client certificate; anyone
//! else is a plaintext caller. A tunnel carries many app connections, each decided on its
//! own (`crate::tunnel`). Policy decides; allowed connections are forwarded to the address and port the
//! caller asked for — the pod's own address, never loopback — so a listener the app bound to
//! loopback on purpose is not reachable through the mesh (ports opted in by the pod's
//! `palisade.dev/inbound-loopback-ports` annotation excepted).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use palisade_ca_api::SpiffeId;
use palisade_ca_api::cert::spiffe_id_from_cert;
use palisade_ca_api::policy::{Caller, Decision, InboundPolicy, Reason, evaluate_inbound};
use palisade_ca_api::tls::MESH_TUNNEL_ALPN;
use tokio::net::TcpStream;

use crate::datapath::{DataPath, OpenConnection, connect};
use crate::denial_log::DenialEvent;
use crate::detect::{Sniff, sniff};
use crate::metrics::Direction;
use crate::relay::relay;
use crate::tls::handshake_failure_reason;

/// Where a connection was meant for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundTarget {
    /// `SO_ORIGINAL_DST`, the pod's own address and port; connections that were not
    /// redirected are refused. Connections for `loopback_ports` go to the loopback address of
    /// the same family instead.
    OriginalDst { loopback_ports: Arc<[u16]> },
    /// Every connection is for this port on 127.0.0.1 (tests and demos on loopback, no
    /// iptables).
    FixedPort(u16),
}

/// Where an allowed connection for `original` is forwarded. Pure.
pub fn forward_to(original: SocketAddr, loopback_ports: &[u16]) -> SocketAddr {
    if loopback_ports.contains(&original.port()) {
        let lo = match original.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(lo, original.port())
    } else {
        original
    }
}

/// Decides on one connection. Without a policy from the control plane yet, refuse. Pure.
pub fn decide(policy: Option<&InboundPolicy>, port: u16, caller: Caller<'_>) -> Decision {
    match policy {
        None => Decision {
            allowed: false,
            audit_would_deny: false,
            policy: "none".into(),
            reason: Reason::NoPolicyYet,
        },
        Some(p) => evaluate_inbound(p, port, caller),
    }
}

/// Handles one captured connection.
pub async fn handle(stream: TcpStream, peer: SocketAddr, dp: Arc<DataPath>, target: InboundTarget) {
    let open = OpenConnection::new(dp.metrics.clone(), Direction::Inbound);
    let Some(original) = original_of(&stream, &dp, &target) else {
        return;
    };
    let upstream = match &target {
        InboundTarget::FixedPort(_) => original,
        InboundTarget::OriginalDst { loopback_ports } => forward_to(original, loopback_ports),
    };
    let port = upstream.port();
    let sniffed = match sniff(&stream, dp.limits.detect_window).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "connection failed during detection");
            return;
        }
    };
    match sniffed {
        Sniff::Mesh => {
            let made = crate::tunnel::Generations::now(&dp);
            let Some((tls, caller_id)) = accept_mesh(stream, &dp).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(MESH_TUNNEL_ALPN) {
                let until = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| crate::tunnel::leaf_not_after(leaf))
                    .unwrap_or(i64::MIN);
                let streams_to = match &target {
                    InboundTarget::FixedPort(p) => crate::tunnel::StreamTarget::Fixed(*p),
                    InboundTarget::OriginalDst { loopback_ports } => {
                        crate::tunnel::StreamTarget::Pod {
                            ip: original.ip(),
                            loopback_ports: loopback_ports.clone(),
                        }
                    }
                };
                let caller = crate::tunnel::TunnelCaller {
                    id: caller_id,
                    peer,
                    until,
                    made,
                };
                // From here the tunnel's streams are the connections counted, one each, so
                // that the gauges still count app connections.
                drop(open);
                return crate::tunnel::serve(tls, caller, dp.clone(), streams_to).await;
            }
            if !admit(&dp, peer, port, Caller::Authenticated(&caller_id)) {
                return;
            }
            if let Some(upstream) = connect_app(&dp, upstream).await {
                finish(&dp, relay(tls, upstream, dp.limits.idle_timeout).await);
            }
        }
        Sniff::Plaintext(_) | Sniff::NeedMore => {
            let how = match sniffed {
                Sniff::Plaintext(h) => h,
                _ => "incomplete_client_hello",
            };
            dp.metrics.plaintext_inbound(how);
            if !admit(&dp, peer, port, Caller::Unauthenticated) {
                return;
            }
            if let Some(upstream) = connect_app(&dp, upstream).await {
                finish(&dp, relay(stream, upstream, dp.limits.idle_timeout).await);
            }
        }
    }
}

/// The address and port the caller asked for (from `SO_ORIGINAL_DST`), or 127.0.0.1 and a
/// fixed port (tests, demo). A connection that reached the inbound port without being
/// redirected is refused.
fn original_of(stream: &TcpStream, dp: &DataPath, target: &InboundTarget) -> Option<SocketAddr> {
    let local = match target {
        InboundTarget::FixedPort(p) => return Some(SocketAddr::from((Ipv4Addr::LOCALHOST, *p))),
        InboundTarget::OriginalDst { .. } => stream.local_addr().ok()?,
    };
    match crate::orig_dst::original_dst(stream, local) {
        Ok(d) if d.port() != local.port() => Some(d),
        Ok(_) | Err(_) => {
            dp.metrics.refused(Direction::Inbound, "not_redirected");
            tracing::warn!(
                "connection reached the inbound port directly, not through the capture rules; closing"
            );
            None
        }
    }
}

/// Terminates mTLS within the handshake timeout and reads the caller's SPIFFE ID.
async fn accept_mesh(
    stream: TcpStream,
    dp: &DataPath,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, SpiffeId)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(dp.server_config.clone());
    let accepted = tokio::time::timeout(dp.limits.handshake_timeout, acceptor.accept(stream))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let tls = match accepted {
        Ok(t) => t,
        Err(e) => {
            let reason = handshake_failure_reason(&e);
            dp.metrics.handshake_failed(Direction::Inbound, reason);
            tracing::info!(reason, error = %e, "mTLS handshake with a caller failed");
            return None;
        }
    };
    let caller_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe_id_from_cert(leaf).ok());
    let Some(caller_id) = caller_id else {
        dp.metrics
            .handshake_failed(Direction::Inbound, "no_identity");
        return None;
    };
    tracing::debug!(peer.id = %caller_id, "caller authenticated");
    Some((tls, caller_id))
}

/// Connects to the app; a refusal is counted and logged.
pub(crate) async fn connect_app(dp: &DataPath, upstream: SocketAddr) -> Option<TcpStream> {
    let port = upstream.port();
    match connect(upstream, dp.limits.connect_timeout).await {
        Ok(s) => Some(s),
        Err(e) => {
            dp.metrics.refused(Direction::Inbound, "app_unreachable");
            tracing::info!(port, error = %e, "the app does not accept on this port");
            None
        }
    }
}

/// Evaluates policy, counts the decision, logs a denial or would-deny; true when allowed.
pub(crate) fn admit(dp: &DataPath, peer: SocketAddr, port: u16, caller: Caller<'_>) -> bool {
    let policy = dp.mesh.inbound();
    let decision = decide(policy.as_deref(), port, caller);
    dp.metrics
        .decision(decision.result(), decision.reason.as_str());
    dp.metrics
        .inbound_connection(&CallerName(caller).to_string(), port, decision.result());
    if decision.allowed && !decision.audit_would_deny {
        // Debug level: silent by default, and the fields are only formatted when enabled.
        tracing::debug!(
            target: "palisade::policy",
            result = decision.result(),
            caller = %CallerName(caller),
            caller_address = %peer,
            target_workload = policy.as_deref().map_or("", |p| p.workload.as_str()),
            port,
            policy = %decision.policy,
            reason = decision.reason.as_str(),
            "connection allowed"
        );
    } else {
        dp.denials.record(&DenialEvent {
            result: decision.result(),
            caller: CallerName(caller).to_string(),
            caller_address: peer.to_string(),
            target: policy.map(|p| p.workload.clone()).unwrap_or_default(),
            port,
            policy: decision.policy.clone(),
            reason: decision.reason.as_str(),
        });
    }
    decision.allowed
}

/// How policy events name a caller: its SPIFFE ID, or `unauthenticated`.
struct CallerName<'a>(Caller<'a>);

impl std::fmt::Display for CallerName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Caller::Authenticated(id) => write!(f, "{id}"),
            Caller::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

fn finish(dp: &DataPath, relayed: crate::relay::Relayed) {
    let crate::relay::Relayed { up, down, result } = relayed;
    dp.metrics.bytes(Direction::Inbound, "to_upstream", up);
    dp.metrics.bytes(Direction::Inbound, "to_downstream", down);
    if let Err(e) = result {
        tracing::debug!(error = %e, "inbound connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_ca_api::policy::DefaultPolicy;

    fn policy(default_policy: DefaultPolicy) -> InboundPolicy {
        InboundPolicy {
            trust_domain: "cluster.local".into(),
            workload: "shop/api".into(),
            namespace: "shop".into(),
            default_policy,
            policies: vec![],
        }
    }

    #[test]
    fn allowed_connections_go_to_the_pod_address_unless_the_port_opted_into_loopback() {
        let pod: SocketAddr = "10.77.0.3:8080".parse().unwrap();
        assert_eq!(forward_to(pod, &[]), pod);
        assert_eq!(forward_to(pod, &[9090]), pod);
        assert_eq!(forward_to(pod, &[8080]), "127.0.0.1:8080".parse().unwrap());
        let pod6: SocketAddr = "[fd00:77::3]:8080".parse().unwrap();
        assert_eq!(forward_to(pod6, &[]), pod6);
        assert_eq!(forward_to(pod6, &[8080]), "[::1]:8080".parse().unwrap());
    }

    #[test]
    fn without_a_policy_everyone_is_refused() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let v = decide(None, 8080, Caller::Authenticated(&id));
        assert!(!v.allowed);
        assert_eq!(v.reason.as_str(), "no_policy_yet");
    }

    #[test]
    fn defaults_apply_to_plaintext_and_mesh_callers() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let p = policy(DefaultPolicy::AllAuthenticated);
        assert!(decide(Some(&p), 80, Caller::Authenticated(&id)).allowed);
        let v = decide(Some(&p), 80, Caller::Unauthenticated);
        assert_eq!(
            (v.allowed, v.result(), v.reason.as_str()),
            (false, "deny", "plaintext_not_allowed")
        );
        assert!(
            decide(
                Some(&policy(DefaultPolicy::All)),
                80,
                Caller::Unauthenticated
            )
            .allowed
        );
    }
}
