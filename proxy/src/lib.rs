//! palisade-proxy: the mesh sidecar (see docs/proxy.md and docs/DESIGN.md).
//!
//! Library code does all the work; `main.rs` only parses the command line, installs the
//! crypto provider, starts tracing and calls [`run::run`].

pub mod admin;
pub mod app;
pub mod balance;
pub mod ca_client;
pub mod clock;
pub mod config;
pub mod datapath;
pub mod denial_log;
pub mod detect;
pub mod drain;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod mesh;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod probes;
pub mod relay;
pub mod run;
pub mod source;
pub mod tls;
pub mod tunnel;

pub use palisade_ca_api as api;
