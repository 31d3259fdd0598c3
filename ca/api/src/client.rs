//! An HTTPS client for the CA API: certificates, trust bundle and the mesh watch.
//!
//! Requests share one HTTP/2 connection, re-made when it breaks. Mesh watches run on a second
//! connection that presents the caller's mesh certificate (mTLS), opened after that
//! certificate exists; many watches multiplex over it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::tls::crypto_provider;
use crate::watch_lines::WatchLines;
use crate::wire::{
    CertificateRequest, CertificateResponse, ErrorBody, ErrorCode, PATH_CERTIFICATES,
    PATH_MESH_WATCH, PATH_TRUST_BUNDLE, TrustBundleResponse, WatchMessage, WatchQuery,
};

/// Largest answer or watch line the client accepts.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "CA server name {0:?} is not a valid DNS name: set PALISADE_CA_NAME to the CA's DNS name"
    )]
    ServerName(String),
    #[error(
        "cannot connect to the CA at {addr}: {source} (is the CA running, and is PALISADE_CA_ADDR right?)"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with the CA at {addr} failed: {source} (check PALISADE_CA_NAME and the trust anchors)"
    )]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP exchange with the CA failed: {0}")]
    Http(String),
    #[error("the CA refused the request ({status} {}): {message}", code.as_str())]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("the CA answered something unexpected: {0}")]
    Decode(String),
    #[error("a mesh watch needs a client certificate: build the client with client_cert")]
    NoClientCertificate,
}

/// Where the CA is and how to trust it.
pub struct CaClientConfig {
    /// `host:port`.
    pub addr: String,
    /// DNS name the CA's certificate must carry.
    pub server_name: String,
    pub roots: Arc<RootCertStore>,
    /// Presents the caller's mesh certificate on watch connections.
    pub client_cert: Option<Arc<dyn ResolvesClientCert>>,
    /// Bound on connecting and on each request.
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct CaClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    server_name: ServerName<'static>,
    timeout: Duration,
    plain: TlsConnector,
    mutual: Option<TlsConnector>,
    plain_conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
    mutual_conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

fn tls_config(
    roots: Arc<RootCertStore>,
    client_cert: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Http(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(resolver) => {
            let mut config = builder.with_client_cert_resolver(resolver);
            // A resumed TLS 1.3 session keeps the client certificate of the session it resumes:
            // after a renewal the CA would go on seeing the old leaf, until it expires.
            config.resumption = rustls::client::Resumption::disabled();
            config
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl CaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| ClientError::ServerName(config.server_name.clone()))?;
        let plain = TlsConnector::from(tls_config(config.roots.clone(), None)?);
        let mutual = match config.client_cert {
            Some(resolver) => Some(TlsConnector::from(tls_config(
                config.roots,
                Some(resolver),
            )?)),
            None => None,
        };
        Ok(CaClient {
            inner: Arc::new(Inner {
                addr: config.addr,
                server_name,
                timeout: config.timeout,
                plain,
                mutual,
                plain_conn: Mutex::new(None),
                mutual_conn: Mutex::new(None),
            }),
        })
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// `POST /v1/certificates` with a service-account token.
    pub async fn request_certificate(
        &self,
        token: &str,
        request: &CertificateRequest,
    ) -> Result<CertificateResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|e| ClientError::Http(format!("the token cannot go in a header: {e}")))?;
        // Never indexed by HPACK (RFC 7541 §7.1.3): a token is a secret, and each one is sent
        // once or twice, so keeping it in the compression table only evicts useful entries.
        authorization.set_sensitive(true);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.inner.uri(PATH_CERTIFICATES))
            .header(header::AUTHORIZATION, authorization)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.inner
            .json_call(&self.inner.plain_conn, &self.inner.plain, req)
            .await
    }

    /// `GET /v1/trust-bundle`.
    pub async fn trust_bundle(&self) -> Result<TrustBundleResponse, ClientError> {
        let req = Request::get(self.inner.uri(PATH_TRUST_BUNDLE))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.inner
            .json_call(&self.inner.plain_conn, &self.inner.plain, req)
            .await
    }

    /// `GET /v1/mesh/watch`: a stream of newline-delimited [`WatchMessage`]s.
    pub async fn watch(&self, query: &WatchQuery) -> Result<WatchStream, ClientError> {
        let connector = self
            .inner
            .mutual
            .as_ref()
            .ok_or(ClientError::NoClientCertificate)?;
        let uri = format!(
            "{}?{}",
            self.inner.uri(PATH_MESH_WATCH),
            query.to_query_string()
        );
        let req = Request::get(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self
            .inner
            .send(&self.inner.mutual_conn, connector, req)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(api_error(resp).await);
        }
        Ok(WatchStream {
            body: resp.into_body(),
            lines: WatchLines::default(),
        })
    }

    /// Drops the pooled connections, so the next call connects afresh (e.g. after the
    /// client certificate changed).
    pub async fn reset_connections(&self) {
        *self.inner.plain_conn.lock().await = None;
        *self.inner.mutual_conn.lock().await = None;
    }
}

impl Inner {
    fn uri(&self, path: &str) -> String {
        let host = match &self.server_name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            other => format!("{other:?}"),
        };
        format!("https://{host}{path}")
    }

    async fn connect(
        &self,
        connector: &TlsConnector,
    ) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let timeout = |_| ClientError::Timeout {
            addr: self.addr.clone(),
            timeout: self.timeout,
        };
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(timeout)?
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.timeout,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(timeout)?
        .map_err(|source| ClientError::Tls {
            addr: self.addr.clone(),
            source,
        })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        // The connection task ends when every sender is dropped or the peer goes away.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "CA connection closed");
            }
        });
        Ok(sender)
    }

    async fn send(
        &self,
        slot: &Mutex<Option<SendRequest<Full<Bytes>>>>,
        connector: &TlsConnector,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut sender = {
            let mut guard = slot.lock().await;
            match guard.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect(connector).await?;
                    *guard = Some(s.clone());
                    s
                }
            }
        };
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: self.addr.clone(),
                timeout: self.timeout,
            })?
    }

    async fn json_call<T: serde::de::DeserializeOwned>(
        &self,
        slot: &Mutex<Option<SendRequest<Full<Bytes>>>>,
        connector: &TlsConnector,
        req: Request<Full<Bytes>>,
    ) -> Result<T, ClientError> {
        let resp = self.send(slot, connector, req).await?;
        if resp.status() != StatusCode::OK {
            return Err(api_error(resp).await);
        }
        let body = read_body(resp.into_body()).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Http(e.to_string()))
}

async fn api_error(resp: http::Response<Incoming>) -> ClientError {
    let status = resp.status().as_u16();
    match read_body(resp.into_body()).await {
        Ok(body) => match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api {
                status,
                code: e.error.code,
                message: e.error.message,
            },
            Err(_) => ClientError::Decode(format!(
                "status {status} with a body that is not a CA error: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        },
        Err(e) => e,
    }
}

/// The messages of one mesh watch, in order.
pub struct WatchStream {
    body: Incoming,
    lines: WatchLines,
}

impl WatchStream {
    /// The next message; `Ok(None)` when the CA ended the stream.
    pub async fn next(&mut self) -> Result<Option<WatchMessage>, ClientError> {
        loop {
            if let Some(message) = self.lines.next_message().map_err(ClientError::Decode)? {
                return Ok(Some(message));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Http(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.lines.push(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}
