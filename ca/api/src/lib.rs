//! Types and checks shared by every Palisade component: the contract between the parts
//! (ports, names, `PALISADE_*` variables and their value forms), SPIFFE identities, certificate
//! reading, the policy model and its evaluation, the CA API's wire types, and (feature
//! `client`) an HTTPS client for that API. No component depends on another's server code.

pub mod cert;
pub mod contract;
pub mod policy;
pub mod spiffe;
pub mod tls;
pub mod wire;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod watch_lines;

pub use spiffe::SpiffeId;
