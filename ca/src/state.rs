//! What the request handlers and the admin port share: the running CA's configuration,
//! rotation (authority), authenticator, mesh publisher, metrics, limiter and audit log.

use std::sync::Arc;

use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::config::ServeConfig;
use crate::mesh::MeshPublisher;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::rotation::Rotation;

/// What request handlers share.
pub struct Ca {
    pub config: ServeConfig,
    /// What signs now and what the mesh trusts, through every phase of a rotation.
    pub rotation: Arc<Rotation>,
    pub authenticator: Arc<dyn Authenticator>,
    pub publisher: MeshPublisher,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    /// Failed token checks per source address, taken before a token is checked.
    pub source_limiter: RateLimiter,
    pub audit: AuditLog,
    pub shutdown: watch::Receiver<bool>,
    /// False until the mesh source has its first complete state (the Kubernetes watches).
    pub ready: watch::Receiver<bool>,
}
