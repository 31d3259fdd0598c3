//! palisade-ca: the certificate authority and control plane of Palisade.
//!
//! [`server::start`] brings up the CA from a [`config::ServeConfig`]; everything it decides lives
//! in pure modules (`csr`, `authority`, `mesh`) that tests call directly.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod config;
pub mod csr;
pub mod handlers;
pub mod keys;
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod ratelimit;
pub mod rotation;
pub mod server;
pub mod state;
pub mod tls_server;
