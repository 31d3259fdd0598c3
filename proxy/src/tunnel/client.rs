//! The outbound side: an app connection to a meshed destination gets a CONNECT stream on a
//! pooled tunnel, or — when the destination's proxy does not speak tunnels, or they are off —
//! a TLS connection of its own, as before tunnels.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use palisade_ca_api::SpiffeId;
use palisade_ca_api::tls::MESH_TUNNEL_ALPN;
use tokio::net::TcpStream;

use super::pool::{Claim, Slot, Tunnel, drive};
use super::{CONNECTION_WINDOW, Generations, MAX_SEND_BUFFER, STREAM_WINDOW, leaf_not_after};
use crate::datapath::DataPath;
use crate::denial_log::LogThrottle;
use crate::metrics::Direction;
use crate::outbound::{OriginateFailure, originate_mesh};
use crate::relay::Relayed;

/// Where an app connection to a meshed destination goes.
pub enum Upstream {
    /// A CONNECT stream the destination's proxy accepted (it answered 200).
    Stream(Stream),
    /// A TLS connection of its own (`palisade/1`).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An accepted CONNECT stream, holding its place on the tunnel.
pub struct Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    _claim: Claim,
}

/// Relays the app's connection over an accepted stream.
pub async fn relay_app(app: TcpStream, stream: Stream, idle: std::time::Duration) -> Relayed {
    let moved = super::relay::relay(app, stream.send, stream.recv, idle).await;
    Relayed {
        up: moved.from_tcp,
        down: moved.from_stream,
        result: moved.result,
    }
}

/// Why a stream could not be had on a tunnel.
enum StreamError {
    /// Refused before anything of the app's was sent (REFUSED_STREAM, GOAWAY, a tunnel that
    /// ended): another tunnel may be tried.
    Refused(h2::Error),
    /// The destination's policy denies this proxy's identity on that port.
    Denied,
    /// Any other answer than 200.
    Status(http::StatusCode),
    Timeout,
}

fn failure(reason: &'static str, retry: bool) -> OriginateFailure {
    OriginateFailure::new(reason, retry)
}

/// Opens the way to `dst` for one app connection, verifying `expected` on a new tunnel. A
/// stream refused before the 200 is tried once more on a fresh tunnel.
pub async fn connect(
    dp: &DataPath,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<Upstream, OriginateFailure> {
    if !dp.limits.tunnels || dp.tunnels.is_tunnel_less(dst) {
        let tls = originate_mesh(dp, dst, expected).await?;
        return Ok(Upstream::Tls(Box::new(tls)));
    }
    let slot = dp.tunnels.slot(dst, expected);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let claim = match claim_or_make(dp, &slot, dst, expected).await? {
            Made::Claim(c) => c,
            Made::Tls(tls) => return Ok(Upstream::Tls(tls)),
        };
        let tunnel = claim.tunnel.clone();
        match open_stream(dp, claim, dst).await {
            Ok(s) => return Ok(Upstream::Stream(s)),
            Err(StreamError::Refused(e)) if attempt < 2 => {
                tracing::debug!(dst = %dst, error = %e, "stream refused before it began: trying a fresh tunnel");
                tunnel.retire();
            }
            Err(StreamError::Refused(e)) => {
                tunnel.retire();
                tracing::info!(dst = %dst, error = %e, "the destination refused the stream twice; closing the app's connection");
                return Err(failure("tunnel_refused", true));
            }
            Err(StreamError::Denied) => {
                dp.metrics
                    .refused(Direction::Outbound, "denied_by_destination");
                static LOG: std::sync::OnceLock<LogThrottle> = std::sync::OnceLock::new();
                if let Some(suppressed) = LOG.get_or_init(|| LogThrottle::new(1, 1)).admit() {
                    tracing::info!(dst = %dst, peer.id = %expected, suppressed_since_last = suppressed,
                        "the destination's policy denies this workload on that port: closing the app's connection");
                }
                return Err(failure("denied_by_destination", false));
            }
            Err(StreamError::Status(code)) => {
                tracing::debug!(dst = %dst, status = code.as_u16(), "the destination could not open the stream");
                dp.metrics
                    .refused(Direction::Outbound, "destination_unreachable");
                return Err(failure("destination_unreachable", code.is_server_error()));
            }
            Err(StreamError::Timeout) => {
                tunnel.retire();
                return Err(failure("tunnel_timeout", true));
            }
        }
    }
}

enum Made {
    Claim(Claim),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A stream's place on a usable tunnel of `slot`, making one when none is (one handshake at a
/// time per key: those who waited use the tunnel it made).
async fn claim_or_make(
    dp: &DataPath,
    slot: &Arc<Slot>,
    dst: SocketAddr,
    expected: &SpiffeId,
) -> Result<Made, OriginateFailure> {
    if let Some(c) = slot.claim(dp) {
        return Ok(Made::Claim(c));
    }
    let _making = slot.making.lock().await;
    if let Some(c) = slot.claim(dp) {
        return Ok(Made::Claim(c));
    }
    let made = Generations::now(dp);
    let own_until = dp.store.valid().map_or(i64::MIN, |c| c.not_after);
    let tls = originate_mesh(dp, dst, expected).await?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(MESH_TUNNEL_ALPN) {
        // An older proxy: this connection serves the app as before, and the next few minutes'
        // connections go the same way without offering the tunnel first.
        dp.tunnels.mark_tunnel_less(dst);
        tracing::debug!(dst = %dst, "the destination's proxy does not speak tunnels");
        return Ok(Made::Tls(Box::new(tls)));
    }
    let peer_until = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| leaf_not_after(leaf))
        .unwrap_or(i64::MIN);
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(super::MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    let handshake = tokio::time::timeout(dp.limits.handshake_timeout, builder.handshake(tls)).await;
    let (send, conn) = match handshake {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(dst = %dst, error = %e, "tunnel handshake failed");
            dp.metrics.handshake_failed(Direction::Outbound, "tunnel");
            return Err(failure("tunnel_handshake", true));
        }
        Err(_) => {
            dp.metrics.handshake_failed(Direction::Outbound, "timeout");
            return Err(failure("timeout", true));
        }
    };
    let tunnel = Tunnel::new(send, made, own_until.min(peer_until));
    let metrics = dp.metrics.clone();
    metrics.tunnel_opened(Direction::Outbound);
    let weak = Arc::downgrade(&tunnel);
    tokio::spawn(async move {
        drive(conn, weak).await;
        metrics.tunnel_closed(Direction::Outbound);
    });
    tracing::debug!(dst = %dst, peer.id = %expected, "tunnel established");
    slot.add(tunnel);
    // A tunnel just made is fresh and empty, unless the bundle or the certificate changed
    // during its handshake; then the caller's retry makes another.
    slot.claim(dp)
        .map(Made::Claim)
        .ok_or_else(|| failure("tunnel_stale", true))
}

/// Sends the CONNECT for `dst` and waits for the answer.
async fn open_stream(dp: &DataPath, claim: Claim, dst: SocketAddr) -> Result<Stream, StreamError> {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .body(())
        .expect("an address is an authority");
    let ready = claim
        .tunnel
        .send
        .clone()
        .ready()
        .await
        .map_err(StreamError::Refused)?;
    let mut ready = ready;
    let (response, send) = ready
        .send_request(request, false)
        .map_err(StreamError::Refused)?;
    let wait = dp.limits.connect_timeout + dp.limits.handshake_timeout;
    let response = match tokio::time::timeout(wait, response).await {
        Err(_) => return Err(StreamError::Timeout),
        Ok(Err(e)) => return Err(StreamError::Refused(e)),
        Ok(Ok(r)) => r,
    };
    match response.status() {
        http::StatusCode::OK => Ok(Stream {
            send,
            recv: response.into_body(),
            _claim: claim,
        }),
        http::StatusCode::FORBIDDEN => Err(StreamError::Denied),
        other => Err(StreamError::Status(other)),
    }
}
