//! The proxy's own identity: the certificate store the TLS configs read from, the pure
//! renewal schedule, and the rotation task that keeps the store filled.

mod rotation;
mod schedule;
mod store;

pub use rotation::{Identity, IdentityConfig, IdentityError, run_rotation};
pub use schedule::{backoff, renew_at};
pub use store::{CertStore, Installed};
