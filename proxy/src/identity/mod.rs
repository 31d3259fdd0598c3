//! The proxy's own identity: the certificate store the TLS configs read from, the pure
//! renewal schedule, the rotation task that keeps the store filled, early renewal when the CA
//! or a new trust bundle asks for it, and the anchors file poller.

mod anchors;
mod early;
mod rotation;
mod schedule;
mod store;

pub use anchors::{ANCHORS_POLL_INTERVAL, AnchorsFile, AnchorsReader, Reading, watch_anchors};
pub use early::{Ask, EarlyRenewal, directive_delay};
pub use rotation::{Identity, IdentityConfig, IdentityError, run_rotation};
pub use schedule::{backoff, jittered_backoff, renew_at};
pub use store::{CertStore, Installed, issuer_fingerprint};
