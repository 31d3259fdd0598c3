//! palisade-proxy: the mesh sidecar (see docs/proxy.md and docs/DESIGN.md).
//!
//! Library code does all the work; `main.rs` only parses the command line, installs the
//! crypto provider, starts tracing and calls [`app::run`].

pub mod clock;
pub mod identity;
pub mod metrics;
pub mod source;
pub mod tls;

pub use palisade_ca_api as api;
