//! The control-plane traits over the real CA API client of `palisade-ca-api`.

use palisade_ca_api::client::{CaClient, ClientError, WatchStream};
use palisade_ca_api::wire::{CertificateRequest, CertificateResponse, WatchMessage, WatchQuery};

use crate::source::{BoxFuture, CertificateSource, MeshSource, SourceError, WatchEvents};

fn convert(e: ClientError) -> SourceError {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => SourceError::Api {
            status,
            code,
            message,
        },
        other => SourceError::Transport(other.to_string()),
    }
}

/// Certificates and mesh watches from the CA over HTTPS.
pub struct CaSource(pub CaClient);

impl CertificateSource for CaSource {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>> {
        Box::pin(async move {
            self.0
                .request_certificate(token, req)
                .await
                .map_err(convert)
        })
    }
}

struct CaWatch(WatchStream);

impl WatchEvents for CaWatch {
    fn next_message(&mut self) -> BoxFuture<'_, Result<Option<WatchMessage>, SourceError>> {
        Box::pin(async move { self.0.next().await.map_err(convert) })
    }
}

impl MeshSource for CaSource {
    fn watch<'a>(
        &'a self,
        query: &'a WatchQuery,
    ) -> BoxFuture<'a, Result<Box<dyn WatchEvents>, SourceError>> {
        Box::pin(async move {
            let stream = self.0.watch(query).await.map_err(convert)?;
            Ok(Box::new(CaWatch(stream)) as Box<dyn WatchEvents>)
        })
    }
}
