//! The control-plane traits over the real CA API client of `palisade-ca-api`.

use palisade_ca_api::client::{CaClient, ClientError, WatchStream};
use palisade_ca_api::wire::{CertificateRequest, CertificateResponse, WatchMessage, WatchQuery};

use std::sync::{Arc, Mutex};

use crate::identity::CertStore;
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
pub struct CaSource {
    client: CaClient,
    /// The proxy's own certificate, presented on watch connections.
    store: Arc<CertStore>,
    /// Serial of the certificate the pooled watch connection was opened with.
    watch_serial: Mutex<Option<String>>,
}

impl CaSource {
    pub fn new(client: CaClient, store: Arc<CertStore>) -> Self {
        CaSource {
            client,
            store,
            watch_serial: Mutex::new(None),
        }
    }
}

impl CertificateSource for CaSource {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>> {
        Box::pin(async move {
            self.client
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
            // The watch needs mTLS: without a certificate there is no point connecting, and a
            // connection pooled before the current certificate would present none or an old one.
            // Waiting here (bounded) opens the watch as soon as the first certificate lands,
            // rather than a backoff step later.
            let mut waited = 0;
            let current = loop {
                if let Some(c) = self.store.valid() {
                    break c;
                }
                if waited >= 100 {
                    return Err(SourceError::Transport(
                        "no certificate yet: the mesh watch needs the proxy's own certificate"
                            .into(),
                    ));
                }
                waited += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let renewed = {
                let mut used = self.watch_serial.lock().unwrap_or_else(|e| e.into_inner());
                let renewed = used.as_deref() != Some(current.serial.as_str());
                *used = Some(current.serial.clone());
                renewed
            };
            if renewed {
                self.client.reset_connections().await;
            }
            let stream = self.client.watch(query).await.map_err(convert)?;
            Ok(Box::new(CaWatch(stream)) as Box<dyn WatchEvents>)
        })
    }
}
