//! The CA API's request handlers. Each refusal is the documented JSON error.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
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
use crate::csr::{CsrError, check_csr, csr_der_from_pem};
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

/// Routes one request; `peer_chain` is the client certificate chain of the connection, if any.
pub async fn route(
    ca: Arc<Ca>,
    peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::POST, PATH_CERTIFICATES) => issue(&ca, req).await,
        (&Method::GET, PATH_TRUST_BUNDLE) => Ok(json_response(
            StatusCode::OK,
            &TrustBundleResponse {
                trust_bundle: ca.authority.trust_bundle_pem().to_vec(),
            },
        )),
        (&Method::GET, PATH_MESH_WATCH) => {
            watch(&ca, peer_chain.as_deref().map(Vec::as_slice), &req)
        }
        (_, PATH_CERTIFICATES | PATH_TRUST_BUNDLE | PATH_MESH_WATCH) => Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!(
                "{} does not take {}: see docs/ca-api.md",
                req.uri().path(),
                req.method()
            ),
        )),
        (_, path) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "no endpoint {path}: the API has POST {PATH_CERTIFICATES}, GET {PATH_TRUST_BUNDLE}, GET {PATH_MESH_WATCH}"
            ),
        )),
    };
    result.unwrap_or_else(|e| error_response(&ca, e))
}

async fn read_json_body(
    req: Request<Incoming>,
) -> Result<(http::request::Parts, CertificateRequest), ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!(
                "the request body exceeds {} KiB: send only {{\"csr\": \"<PEM>\"}}",
                MAX_REQUEST_BODY_BYTES / 1024
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let bytes = Limited::new(body, MAX_REQUEST_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::new(
                    ErrorCode::MalformedRequest,
                    format!("the request body could not be read: {e}"),
                )
            }
        })?
        .to_bytes();
    let request = serde_json::from_slice::<CertificateRequest>(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedRequest,
            format!("the body is not the expected JSON ({e}): send {{\"csr\": \"<PEM CSR>\", \"ttl_seconds\": <optional>}}"),
        )
    })?;
    Ok((parts, request))
}

fn bearer_token(parts: &http::request::Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn issue(ca: &Ca, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let (parts, request) = read_json_body(req).await?;
    let token = bearer_token(&parts).unwrap_or_default();
    let who = ca
        .authenticator
        .authenticate(token)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
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
            ttl
        }
    };
    let der = csr_der_from_pem(&request.csr).map_err(csr_error)?;
    let accepted = check_csr(&der, &id).map_err(csr_error)?;
    let now = time::OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(ttl).expect("ttl fits");
    let issued = ca
        .authority
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
    let mut chain = Vec::with_capacity(1 + ca.authority.chain_tail().len());
    chain.push(issued.pem);
    chain.extend(ca.authority.chain_tail().iter().cloned());
    let body = CertificateResponse {
        spiffe_id: id.to_string(),
        certificate_chain: chain,
        trust_bundle: ca.authority.trust_bundle_pem().to_vec(),
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
    let id = palisade_ca_api::tls::verify_workload_chain(ca.roots.clone(), chain, UnixTime::now())
        .map_err(|e| untrusted(e.to_string()))?;
    if id.trust_domain() != td {
        return Err(untrusted(format!(
            "it belongs to trust domain {:?}",
            id.trust_domain()
        )));
    }
    let query = WatchQuery::parse(req.uri().query().unwrap_or_default())
        .map_err(|m| ApiError::new(ErrorCode::InvalidWatchQuery, m))?;
    if let Some(ip) = query.pod_ip {
        let snapshot = ca.publisher.current();
        if let Some(w) = snapshot.state.workload_at(ip)
            && (w.namespace != id.namespace() || w.service_account != id.service_account())
        {
            return Err(ApiError::new(
                ErrorCode::IdentityMismatch,
                format!(
                    "pod_ip {ip} is workload {}/{} with service account {}, not {id}: watch your own pod's address",
                    w.namespace, w.name, w.service_account
                ),
            ));
        }
    }
    tracing::debug!(peer.id = %id, destinations = query.destinations.len(), "mesh watch opened");
    let metrics = ca.metrics.clone();
    metrics.watch_opened();
    let guard = WatchGuard(metrics);
    let stream =
        crate::mesh::watch::watch_stream(ca.publisher.subscribe(), query, ca.shutdown.clone()).map(
            move |line| {
                let _ = &guard;
                Ok::<_, Infallible>(Frame::data(line))
            },
        );
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
