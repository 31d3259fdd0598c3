//! palisade-injector: the mutating admission webhook that adds palisade-proxy and its traffic
//! capture to pods (DESIGN.md, "Injector"; annotations and contracts in docs/injector.md).
//!
//! Pure parts: `annotations` (per-pod overrides), `decision` (inject or skip), `probes` and
//! `patch` (the RFC 6902 patch), `review` (AdmissionReview in, response out). I/O parts: `tls`
//! (certificate reload) and `server` (webhook and admin sockets).

pub mod annotations;
pub mod cli;
pub mod decision;
pub mod json_patch;
pub mod metrics;
pub mod patch;
pub mod probes;
pub mod review;
pub mod server;
pub mod settings;
pub mod sidecar;
pub mod tls;

pub use review::{ReviewError, ReviewOutcome, Verdict, review};
pub use server::{Bound, ServeConfig, ServeError, start};
pub use settings::{InjectorSettings, RawSettings};
