//! The CA API's request handlers. Each refusal is the documented JSON error.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::wire::{
    CertificateRequest, CertificateResponse, ErrorBody, ErrorCode, MAX_REQUEST_BODY_BYTES,
    MAX_TTL_SECONDS, PATH_CERTIFICATES, PATH_MESH_WATCH, PATH_TRUST_BUNDLE, TrustBundleResponse,
    WatchQuery,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::format_description::well_known::Rfc3339;

use crate::audit::Issuance;
use crate::auth::{AuthError, TokenIdentity};
use crate::csr::{CsrError, check_csr, csr_der_from_pem};
use crate::rotation::WatchReport;
use crate::state::Ca;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A refusal: its code, and what was wrong and what to do.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("API types serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .expect("static response parts")
}

fn error_response(ca: &Ca, e: ApiError) -> Response<Body> {
    ca.metrics.refused(e.code.as_str());
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &ErrorBody::new(e.code, e.message));
    if let Some(secs) = e.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    resp
}

/// The methods each path takes, for the `Allow` header of a 405 (RFC 9110, 15.5.6).
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        PATH_CERTIFICATES => Some("POST"),
        PATH_TRUST_BUNDLE => Some("GET, HEAD"),
        PATH_MESH_WATCH => Some("GET"),
        _ => None,
    }
}

/// Routes one request from `peer`; `peer_chain` is the client certificate chain of the
/// connection, if any. `HEAD` is answered as `GET` would be, without the body, on both HTTP/1.1
/// and HTTP/2.
pub async fn route(
    ca: Arc<Ca>,
    peer: IpAddr,
    peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let path = req.uri().path().to_owned();
    let result = match (req.method(), path.as_str()) {
        (&Method::POST, PATH_CERTIFICATES) => issue(&ca, peer, req).await,
        (&Method::GET | &Method::HEAD, PATH_TRUST_BUNDLE) => Ok(json_response(
            StatusCode::OK,
            &TrustBundleResponse {
                trust_bundle: ca.rotation.authority().trust_bundle_pem().to_vec(),
            },
        )),
        (&Method::GET, PATH_MESH_WATCH) => {
            watch(&ca, peer_chain.as_deref().map(Vec::as_slice), &req)
        }
        (method, path @ (PATH_CERTIFICATES | PATH_TRUST_BUNDLE | PATH_MESH_WATCH)) => {
            Err(ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!(
                    "{path} does not take {method}: it takes {}; see docs/ca-api.md",
                    allowed_methods(path).unwrap_or_default()
                ),
            ))
        }
        (_, path) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "no endpoint {path}: the API has POST {PATH_CERTIFICATES}, GET {PATH_TRUST_BUNDLE}, GET {PATH_MESH_WATCH}"
            ),
        )),
    };
    let mut response = result.unwrap_or_else(|e| error_response(&ca, e));
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = allowed_methods(&path)
    {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    }
    if head {
        response = without_body(response);
    }
    response
}

/// The answer to a `HEAD`: the headers `GET` would get, its length included, and no body.
fn without_body(response: Response<Body>) -> Response<Body> {
    use hyper::body::Body as _;
    let (mut parts, body) = response.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| len.into());
    }
    Response::from_parts(parts, Empty::new().boxed_unsync())
}

/// A request body must have arrived this long after its headers.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Of a body over the limit, up to this much is read and thrown away (within
/// [`DRAIN_TIMEOUT`]) before the 413 is sent, so that a client still sending it sees the answer
/// rather than a reset stream (HTTP/2) or connection (HTTP/1.1).
const DRAIN_BYTES: u64 = 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

async fn read_json_body(
    parts: &http::request::Parts,
    mut body: Incoming,
) -> Result<CertificateRequest, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!(
                "the request body exceeds {} KiB: send only {{\"csr\": \"<PEM>\"}}",
                MAX_REQUEST_BODY_BYTES / 1024
            ),
        )
    };
    let unreadable = |why: String| {
        ApiError::new(
            ErrorCode::MalformedRequest,
            format!("the request body could not be read: {why}"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max = MAX_REQUEST_BODY_BYTES as u64;
    if let Some(declared) = declared.filter(|n| *n > max) {
        if declared <= max + DRAIN_BYTES {
            drain(&mut body).await;
        }
        return Err(too_large());
    }
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, collect_at_most(&mut body, max)).await
    {
        Err(_) => {
            return Err(unreadable(format!(
                "it did not arrive within {}s",
                BODY_READ_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(unreadable(e.to_string())),
        Ok(Ok(None)) => {
            drain(&mut body).await;
            return Err(too_large());
        }
        Ok(Ok(Some(bytes))) => bytes,
    };
    let request = serde_json::from_slice::<CertificateRequest>(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedRequest,
            format!("the body is not the expected JSON ({e}): send {{\"csr\": \"<PEM CSR>\", \"ttl_seconds\": <optional>}}"),
        )
    })?;
    Ok(request)
}

/// The whole body, or `None` as soon as it passes `max` bytes.
async fn collect_at_most(body: &mut Incoming, max: u64) -> Result<Option<Vec<u8>>, hyper::Error> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if (bytes.len() + data.len()) as u64 > max {
                return Ok(None);
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(Some(bytes))
}

/// Reads and discards the rest of `body`, at most [`DRAIN_BYTES`] within [`DRAIN_TIMEOUT`].
async fn drain(body: &mut Incoming) {
    let discard = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                let Some(rest) = left.checked_sub(data.len() as u64) else {
                    return;
                };
                left = rest;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard).await;
}

fn bearer_token(parts: &http::request::Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the token of a certificate request, first of all (a request with neither a valid
/// token nor a valid body is a 401). A source that has failed too many checks is refused
/// before its token costs anything: each check takes a place from its source's bucket, and a
/// valid token gives it back.
async fn authenticate(
    ca: &Ca,
    peer: IpAddr,
    parts: &http::request::Parts,
) -> Result<TokenIdentity, ApiError> {
    let token = bearer_token(parts).unwrap_or_default();
    if token.is_empty() {
        let missing = AuthError::Missing;
        return Err(ApiError::new(missing.code(), missing.to_string()));
    }
    let source = peer.to_canonical().to_string();
    if let Err(retry) = ca.source_limiter.check(&source, Instant::now()) {
        ca.metrics.source_limited(&source);
        return Err(ApiError {
            code: ErrorCode::RateLimited,
            message: format!(
                "too many failed token checks from {source}: retry in {retry}s with a valid service-account token (audience palisade-ca)"
            ),
            retry_after: Some(retry),
        });
    }
    let who = ca
        .authenticator
        .authenticate(token)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    ca.source_limiter.give_back(&source);
    Ok(who)
}

async fn issue(ca: &Ca, peer: IpAddr, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let who = authenticate(ca, peer, &parts).await?;
    let request = read_json_body(&parts, body).await?;
    let id = SpiffeId::new(
        &ca.config.trust_domain,
        &who.namespace,
        &who.service_account,
    )
    .map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidToken,
            format!("the token names no valid identity: {e}"),
        )
    })?;
    if let Err(retry) = ca.limiter.check(&id.workload_name(), Instant::now()) {
        return Err(ApiError {
            code: ErrorCode::RateLimited,
            message: format!(
                "too many certificate requests for {id}: retry in {retry}s (a proxy renews about every 30 minutes)"
            ),
            retry_after: Some(retry),
        });
    }
    let ttl = match request.ttl_seconds {
        None => ca.config.cert_ttl,
        Some(secs) => {
            let ttl = std::time::Duration::from_secs(secs);
            if ttl < ca.config.min_ttl() || secs > MAX_TTL_SECONDS {
                return Err(ApiError::new(
                    ErrorCode::InvalidTtl,
                    format!(
                        "ttl_seconds {secs} is outside {}..{MAX_TTL_SECONDS}: ask for 5 minutes to 24 hours, or omit it for the default",
                        ca.config.min_ttl().as_secs()
                    ),
                ));
            }
            // The CA's own cap, whatever the caller asks.
            ttl.min(ca.config.max_cert_ttl)
        }
    };
    let der = csr_der_from_pem(&request.csr).map_err(csr_error)?;
    let accepted = check_csr(&der, &id).map_err(csr_error)?;
    let now = time::OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(ttl).expect("ttl fits");
    // One authority for the whole answer, whatever a rotation swaps in meanwhile.
    let authority = ca.rotation.authority();
    let issued = authority
        .issue_leaf(&accepted.spki_der, &id, ttl, now)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("signing failed: {e}")))?;
    let expires_at = issued.not_after.format(&Rfc3339).expect("RFC 3339 formats");
    ca.audit
        .certificate_issued(&Issuance {
            serial: &issued.serial,
            id: &id,
            pod: who.pod_name.as_deref(),
            namespace: &who.namespace,
            not_after: &expires_at,
            authenticator: ca.authenticator.name(),
            key_type: accepted.key_type,
        })
        .await;
    let mut chain = Vec::with_capacity(1 + authority.chain_tail().len());
    chain.push(issued.pem);
    chain.extend(authority.chain_tail().iter().cloned());
    let body = CertificateResponse {
        spiffe_id: id.to_string(),
        certificate_chain: chain,
        trust_bundle: authority.trust_bundle_pem().to_vec(),
        expires_at,
    };
    ca.metrics
        .issued(ca.authenticator.name(), started.elapsed());
    Ok(json_response(StatusCode::OK, &body))
}

fn csr_error(e: CsrError) -> ApiError {
    let code = match &e {
        CsrError::NotPem | CsrError::Malformed(_) | CsrError::BadSignature => ErrorCode::InvalidCsr,
        CsrError::UnsupportedKey(_) => ErrorCode::UnsupportedKey,
        CsrError::ForbiddenContent(_) => ErrorCode::ForbiddenCsrContent,
        CsrError::IdentityMismatch { .. } => ErrorCode::IdentityMismatch,
    };
    ApiError::new(code, e.to_string())
}

fn watch(
    ca: &Arc<Ca>,
    peer_chain: Option<&[CertificateDer<'static>]>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let chain = peer_chain.filter(|c| !c.is_empty()).ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingClientCertificate,
            "the mesh watch needs mTLS: present the proxy's mesh certificate (from POST /v1/certificates)",
        )
    })?;
    let td = &ca.config.trust_domain;
    let untrusted = |why: String| {
        ApiError::new(
            ErrorCode::UntrustedClientCertificate,
            format!(
                "the client certificate is not a mesh identity of trust domain {td:?}: {why}; get one from this CA"
            ),
        )
    };
    let roots = ca.rotation.authority().root_store();
    let id = palisade_ca_api::tls::verify_workload_chain(roots, chain, UnixTime::now())
        .map_err(|e| untrusted(e.to_string()))?;
    if id.trust_domain() != td {
        return Err(untrusted(format!(
            "it belongs to trust domain {:?}",
            id.trust_domain()
        )));
    }
    let query = WatchQuery::parse(req.uri().query().unwrap_or_default())
        .map_err(|m| ApiError::new(ErrorCode::InvalidWatchQuery, m))?;
    let owner = crate::mesh::watch::Owner {
        namespace: id.namespace().to_owned(),
        service_account: id.service_account().to_owned(),
    };
    // The workload at `pod_ip` (`namespace/name`), once its ownership is checked.
    let mut pod = None;
    if let Some(ip) = query.pod_ip {
        let snapshot = ca.publisher.current();
        match snapshot.state.workload_at(ip) {
            Some(w) if owner.holds(w) => pod = Some(format!("{}/{}", w.namespace, w.name)),
            Some(w) => {
                return Err(ApiError::new(
                    ErrorCode::IdentityMismatch,
                    format!(
                        "pod_ip {ip} is workload {}/{} with service account {}, not {id}: watch your own pod's address",
                        w.namespace, w.name, w.service_account
                    ),
                ));
            }
            None => {
                return Err(ApiError::new(
                    ErrorCode::IdentityMismatch,
                    format!(
                        "no workload of {id} holds pod_ip {ip}: watch your own pod's address (a pod the control plane has not seen yet is refused until it has; the proxy retries)"
                    ),
                ));
            }
        }
    }
    // The stream lives no longer than the certificate that opened it: the proxy reopens it
    // with its renewed one.
    let (_, not_before, not_after) = palisade_ca_api::cert::serial_and_validity(&chain[0])
        .map_err(|e| untrusted(e.to_string()))?;
    let lives_for = (not_after - time::OffsetDateTime::now_utc())
        .try_into()
        .unwrap_or(std::time::Duration::ZERO);
    let until = tokio::time::Instant::now() + lives_for;
    ca.rotation.registry.report(WatchReport {
        pod_ip: query.pod_ip,
        pod,
        spiffe_id: id.to_string(),
        owner: owner.clone(),
        roots: query.roots.clone(),
        leaf_issuer: ca.rotation.issuer_of(&chain[0]),
        leaf_not_before: not_before.unix_timestamp(),
        leaf_not_after: not_after.unix_timestamp(),
    });
    tracing::debug!(peer.id = %id, destinations = query.destinations.len(), "mesh watch opened");
    let metrics = ca.metrics.clone();
    metrics.watch_opened();
    let guard = WatchGuard(metrics);
    let stream = crate::mesh::watch::watch_stream(
        ca.publisher.subscribe(),
        ca.rotation.subscribe(),
        query,
        owner,
        until,
        ca.shutdown.clone(),
    )
    .map(move |line| {
        let _ = &guard;
        Ok::<_, Infallible>(Frame::data(line))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("static response parts"))
}

/// Counts a watch as open for as long as its stream lives.
struct WatchGuard(Arc<crate::metrics::Metrics>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watch_closed();
    }
}
