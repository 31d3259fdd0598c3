//! The inbound side of a tunnel: HTTP/2 over the caller's mTLS connection, each CONNECT
//! stream one app connection. The caller is the tunnel's verified identity; policy is decided
//! per stream; the address is always this pod's own (the tunnel's original destination), only
//! the port comes from the stream; each stream holds a connection slot as a connection would.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::Caller;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{
    CONNECTION_WINDOW, Generations, MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER,
    STREAM_WINDOW, still_fresh,
};
use crate::datapath::{DataPath, OpenConnection};
use crate::inbound::{admit, connect_app, forward_to};
use crate::metrics::Direction;

/// Where a tunnel's streams go.
#[derive(Debug, Clone)]
pub enum StreamTarget {
    /// This pod's address (the tunnel's `SO_ORIGINAL_DST`), with the port of each stream;
    /// `loopback_ports` go to loopback as for a connection of their own.
    Pod {
        ip: IpAddr,
        loopback_ports: Arc<[u16]>,
    },
    /// Every stream goes to 127.0.0.1 on this port, which is also the port policy sees
    /// (tests and demos on loopback).
    Fixed(u16),
}

impl StreamTarget {
    /// The app's address for a stream asking for `port`, and the port policy judges. Pure.
    pub fn resolve(&self, port: u16) -> (SocketAddr, u16) {
        match self {
            StreamTarget::Fixed(p) => (SocketAddr::from((Ipv4Addr::LOCALHOST, *p)), *p),
            StreamTarget::Pod { ip, loopback_ports } => {
                (forward_to(SocketAddr::new(*ip, port), loopback_ports), port)
            }
        }
    }
}

/// The port a CONNECT request asks for; the host part is never used. Pure.
pub fn requested_port(req: &http::Request<h2::RecvStream>) -> Result<u16, &'static str> {
    if req.method() != http::Method::CONNECT {
        return Err("not_connect");
    }
    let authority = req.uri().authority().ok_or("no_authority")?;
    match authority.port_u16() {
        Some(p) if p != 0 => Ok(p),
        _ => Err("no_port"),
    }
}

/// Who the tunnel's caller is and what its handshake was verified under.
pub struct TunnelCaller {
    pub id: SpiffeId,
    pub peer: SocketAddr,
    /// Unix seconds: the caller's leaf `notAfter`.
    pub until: i64,
    pub made: Generations,
}

/// Serves one tunnel until the caller closes it (or it fails), each stream in a task this
/// function owns.
pub async fn serve<IO>(io: IO, caller: TunnelCaller, dp: Arc<DataPath>, target: StreamTarget)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    dp.metrics.tunnel_opened(Direction::Inbound);
    let _open = TunnelOpen(dp.clone());
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    let handshake = tokio::time::timeout(dp.limits.handshake_timeout, builder.handshake(io)).await;
    let mut conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            dp.metrics.handshake_failed(Direction::Inbound, "tunnel");
            tracing::info!(peer.id = %caller.id, error = %e, "tunnel preface failed");
            return;
        }
        Err(_) => {
            dp.metrics.handshake_failed(Direction::Inbound, "timeout");
            tracing::info!(peer.id = %caller.id, "no tunnel preface within the handshake timeout");
            return;
        }
    };
    let caller = Arc::new(caller);
    let mut streams = JoinSet::new();
    let mut stale = false;
    let mut draining = dp.inbound_draining.subscribe();
    let mut told_to_drain = false;
    loop {
        // The connection is polled all along (it drives every stream's I/O); finished streams
        // are reaped as they end, and a tunnel left without streams is closed after a while,
        // so that an empty tunnel does not hold a connection slot.
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            _ = crate::datapath::until_true(&mut draining), if !told_to_drain => {
                // The proxy is shutting down: the caller takes its new connections elsewhere,
                // the open ones finish.
                told_to_drain = true;
                conn.graceful_shutdown();
                continue;
            }
            _ = tokio::time::sleep(dp.limits.tunnel_idle_timeout), if streams.is_empty() && !told_to_drain => {
                tracing::debug!(peer.id = %caller.id, "tunnel without streams: closing");
                told_to_drain = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(accepted) = accepted else {
            break;
        };
        let (req, mut respond) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(peer.id = %caller.id, error = %e, "tunnel ended");
                break;
            }
        };
        // What a new TLS connection would be checked against now: a tunnel verified under
        // older roots or an older own certificate, or whose caller's leaf has expired, takes
        // no new stream; the caller makes a fresh tunnel, which is verified anew.
        if !still_fresh(
            caller.made,
            Generations::now(&dp),
            caller.until,
            dp.store.clock().unix(),
        ) {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            dp.metrics.refused(Direction::Inbound, "tunnel_stale");
            if !stale {
                stale = true;
                tracing::debug!(peer.id = %caller.id, "tunnel stale: refusing its new streams");
                conn.graceful_shutdown();
            }
            continue;
        }
        let Ok(slot) = dp.slots[Direction::Inbound as usize]
            .clone()
            .try_acquire_owned()
        else {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            dp.metrics.refused(Direction::Inbound, "connection_limit");
            continue;
        };
        let Some(source) = dp.sources.admit(caller.peer.ip()) else {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            dp.metrics
                .refused(Direction::Inbound, "source_connection_limit");
            continue;
        };
        let port = match requested_port(&req) {
            Ok(p) => p,
            Err(why) => {
                dp.metrics.refused(Direction::Inbound, "bad_tunnel_request");
                tracing::debug!(peer.id = %caller.id, why, "malformed tunnel request");
                answer(&mut respond, http::StatusCode::BAD_REQUEST);
                continue;
            }
        };
        let span = tracing::debug_span!("stream", dst.port = port);
        let (dp, caller, target) = (dp.clone(), caller.clone(), target.clone());
        streams.spawn(
            async move {
                let _slot = slot;
                let _source = source;
                stream(req.into_body(), respond, &dp, &caller, target.resolve(port)).await;
            }
            .instrument(span),
        );
    }
    // The connection is gone: streams still running end as their halves fail or finish.
    while streams.join_next().await.is_some() {}
}

/// Counts the tunnel closed when dropped.
struct TunnelOpen(Arc<DataPath>);

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0.metrics.tunnel_closed(Direction::Inbound);
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: http::StatusCode) {
    let response = http::Response::builder()
        .status(status)
        .body(())
        .expect("a status is a response");
    let _ = respond.send_response(response, true);
}

/// One stream: policy for the caller on `port`, then the app, then the relay.
async fn stream(
    body: h2::RecvStream,
    mut respond: SendResponse<Bytes>,
    dp: &DataPath,
    caller: &TunnelCaller,
    (upstream, port): (SocketAddr, u16),
) {
    let _open = OpenConnection::new(dp.metrics.clone(), Direction::Inbound);
    if !admit(dp, caller.peer, port, Caller::Authenticated(&caller.id)) {
        answer(&mut respond, http::StatusCode::FORBIDDEN);
        return;
    }
    let Some(app) = connect_app(dp, upstream).await else {
        answer(&mut respond, http::StatusCode::BAD_GATEWAY);
        return;
    };
    let ok = http::Response::builder()
        .status(http::StatusCode::OK)
        .body(())
        .expect("a status is a response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "the caller left before the stream was accepted");
            return;
        }
    };
    relay_stream(dp, app, send, body).await;
}

async fn relay_stream(
    dp: &DataPath,
    app: TcpStream,
    send: h2::SendStream<Bytes>,
    body: h2::RecvStream,
) {
    let moved = super::relay::relay(app, send, body, dp.limits.idle_timeout).await;
    dp.metrics
        .bytes(Direction::Inbound, "to_upstream", moved.from_stream);
    dp.metrics
        .bytes(Direction::Inbound, "to_downstream", moved.from_tcp);
    if let Err(e) = moved.result {
        tracing::debug!(error = %e, "inbound stream ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_goes_to_the_pod_address_on_its_port_or_to_the_fixed_port() {
        let pod = StreamTarget::Pod {
            ip: "10.77.0.3".parse().unwrap(),
            loopback_ports: Arc::from(vec![9090u16]),
        };
        assert_eq!(pod.resolve(8080), ("10.77.0.3:8080".parse().unwrap(), 8080));
        assert_eq!(pod.resolve(9090), ("127.0.0.1:9090".parse().unwrap(), 9090));
        let fixed = StreamTarget::Fixed(7000);
        assert_eq!(
            fixed.resolve(8080),
            ("127.0.0.1:7000".parse().unwrap(), 7000)
        );
    }
}
