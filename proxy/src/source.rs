//! What the proxy needs from the control plane, as two small traits: certificates and the mesh
//! watch. `ca_client` implements them over the CA API; tests implement them in process.

use std::future::Future;
use std::pin::Pin;

use palisade_ca_api::wire::{
    CertificateRequest, CertificateResponse, ErrorCode, WatchMessage, WatchQuery,
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The CA answered with an error body.
    #[error("CA answered {status} {code}: {message}", code = code.as_str())]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// The CA could not be reached or its answer could not be read.
    #[error("CA unreachable or unreadable: {0}")]
    Transport(String),
}

/// Issues certificates (`POST /v1/certificates`).
pub trait CertificateSource: Send + Sync + 'static {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>>;
}

/// Opens mesh watches (`GET /v1/mesh/watch`).
pub trait MeshWatcher: Send + Sync + 'static {
    fn watch<'a>(
        &'a self,
        query: &'a WatchQuery,
    ) -> BoxFuture<'a, Result<Box<dyn WatchEvents>, SourceError>>;
}

/// One open watch: a snapshot, then updates; `Ok(None)` when the server ended the stream.
pub trait WatchEvents: Send {
    fn next_message(&mut self) -> BoxFuture<'_, Result<Option<WatchMessage>, SourceError>>;
}
