//! The control-plane traits over the real CA API client of `palisade-ca-api`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_ca_api::client::{CaClient, CaClientConfig, ClientError, WatchStream};
use palisade_ca_api::wire::{CertificateRequest, CertificateResponse, WatchMessage, WatchQuery};
use rustls::RootCertStore;

use crate::identity::CertStore;
use crate::source::{BoxFuture, CertificateSource, MeshWatcher, SourceError, WatchEvents};
use crate::tls::TrustBundle;

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

/// Where the CA is.
#[derive(Debug, Clone)]
pub struct CaEndpoint {
    pub addr: String,
    pub server_name: String,
    pub timeout: Duration,
}

/// Certificates and mesh watches from the CA over HTTPS. The CA is trusted through the mesh's
/// current trust bundle: when the bundle changes (a root rotation) the client is rebuilt, so a
/// CA serving from the new root stays reachable.
pub struct CaSource {
    endpoint: CaEndpoint,
    /// The proxy's own certificate, presented on watch connections.
    store: Arc<CertStore>,
    bundle: Arc<TrustBundle>,
    /// The client and the roots it was built with.
    client: Mutex<(Arc<RootCertStore>, CaClient)>,
    /// Serial of the certificate the pooled watch connection was opened with.
    watch_serial: Mutex<Option<String>>,
}

impl CaSource {
    pub fn new(
        endpoint: CaEndpoint,
        store: Arc<CertStore>,
        bundle: Arc<TrustBundle>,
    ) -> Result<Self, ClientError> {
        let roots = bundle.roots();
        let client = Self::build(&endpoint, roots.clone(), &store)?;
        Ok(CaSource {
            endpoint,
            store,
            bundle,
            client: Mutex::new((roots, client)),
            watch_serial: Mutex::new(None),
        })
    }

    fn build(
        endpoint: &CaEndpoint,
        roots: Arc<RootCertStore>,
        store: &Arc<CertStore>,
    ) -> Result<CaClient, ClientError> {
        CaClient::new(CaClientConfig {
            addr: endpoint.addr.clone(),
            server_name: endpoint.server_name.clone(),
            roots,
            client_cert: Some(store.clone()),
            timeout: endpoint.timeout,
        })
    }

    /// The client for the current trust bundle.
    fn client(&self) -> Result<CaClient, SourceError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let roots = self.bundle.roots();
        if !Arc::ptr_eq(&slot.0, &roots) {
            let client = Self::build(&self.endpoint, roots.clone(), &self.store)
                .map_err(|e| SourceError::Transport(e.to_string()))?;
            *slot = (roots, client);
            tracing::info!("trust bundle changed: reconnecting to the CA with the new roots");
        }
        Ok(slot.1.clone())
    }
}

impl CertificateSource for CaSource {
    fn request_certificate<'a>(
        &'a self,
        token: &'a str,
        req: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<CertificateResponse, SourceError>> {
        Box::pin(async move {
            self.client()?
                .request_certificate(token, req)
                .await
                .map_err(convert)
        })
    }
}

/// How long a watch waits for the proxy's first certificate before it reports an error (and is
/// retried with backoff).
const FIRST_CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct CaWatch(WatchStream);

impl WatchEvents for CaWatch {
    fn next_message(&mut self) -> BoxFuture<'_, Result<Option<WatchMessage>, SourceError>> {
        Box::pin(async move { self.0.next().await.map_err(convert) })
    }
}

impl MeshWatcher for CaSource {
    fn watch<'a>(
        &'a self,
        query: &'a WatchQuery,
    ) -> BoxFuture<'a, Result<Box<dyn WatchEvents>, SourceError>> {
        Box::pin(async move {
            // The watch needs mTLS: without a certificate there is no point connecting, and a
            // connection pooled before the current certificate would present none or an old one.
            // Waiting here (bounded) opens the watch as soon as the first certificate lands,
            // rather than a backoff step later.
            let mut installs = self.store.installs();
            let deadline = tokio::time::sleep(FIRST_CERTIFICATE_WAIT);
            tokio::pin!(deadline);
            let current = loop {
                if let Some(c) = self.store.valid() {
                    break c;
                }
                let no_certificate = || {
                    SourceError::Transport(
                        "no certificate yet: the mesh watch needs the proxy's own certificate"
                            .into(),
                    )
                };
                tokio::select! {
                    changed = installs.changed() => changed.map_err(|_| no_certificate())?,
                    _ = &mut deadline => return Err(no_certificate()),
                }
            };
            let renewed = {
                let mut used = self.watch_serial.lock().unwrap_or_else(|e| e.into_inner());
                let renewed = used.as_deref() != Some(current.serial.as_str());
                *used = Some(current.serial.clone());
                renewed
            };
            let client = self.client()?;
            if renewed {
                client.reset_connections().await;
            }
            let stream = client.watch(query).await.map_err(convert)?;
            Ok(Box::new(CaWatch(stream)) as Box<dyn WatchEvents>)
        })
    }
}
