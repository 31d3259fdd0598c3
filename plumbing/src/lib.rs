//! The process plumbing every Palisade binary (CA, injector, proxy) shares, written once so
//! that their bounds and shapes cannot drift apart:
//!
//! - [`admin_http`]: the bounded plain-HTTP server behind each admin port (connection caps,
//!   header-read timeout, a deadline per connection, back-off on accept errors);
//! - [`conn_gate`]: the connection caps (in all and per source) every listener admits through,
//!   the counters of what its bounds did, and the rate-limited warning when one bites;
//! - [`metrics`]: Prometheus text exposition (one encoder, one histogram, one labelled counter);
//! - [`logging`]: the one tracing setup, with the same JSON shape in every binary;
//! - [`credentials`]: a certificate chain and key loaded and checked to match, and the resolver
//!   that hands the current one to every handshake and swaps it in place.
//!
//! The crypto provider's choke point stays in `palisade_ca_api::tls`, which every side already
//! depends on.

pub mod admin_http;
pub mod conn_gate;
pub mod credentials;
pub mod logging;
pub mod metrics;

use tokio::sync::watch;

/// Resolves once `stop` holds `true`, or its sender is gone: the stop signal every server
/// loop of every binary waits on.
pub async fn until_true(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
