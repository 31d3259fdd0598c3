//! One AdmissionReview in, one out: parsing, the decision, the patch and the response body.
//! No I/O, so every path is tested without sockets; the server only moves bytes.

use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube_core::GroupVersionKind;
use kube_core::admission::{AdmissionRequest, META_API_VERSION_V1, META_KIND, Operation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::decision::{SkipReason, skip_pod, skip_request};
use crate::patch::{InjectError, build_patch};
use crate::settings::InjectorSettings;

/// Input that is not an AdmissionReview the injector can answer: HTTP 400 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not a JSON AdmissionReview: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error(
        "apiVersion is {0:?}, but palisade-injector answers only \"admission.k8s.io/v1\"; set \
         admissionReviewVersions: [\"v1\"] in the MutatingWebhookConfiguration"
    )]
    ApiVersion(Option<String>),
    #[error("kind is {0:?}, but the body of POST /mutate must be an \"AdmissionReview\"")]
    Kind(Option<String>),
    #[error("the AdmissionReview has no request; send the review the API server built")]
    NoRequest,
    #[error(
        "request.uid is missing or empty; the API server sets it and the response must echo it"
    )]
    NoUid,
    #[error("request is malformed: {0}")]
    BadRequest(#[source] serde_json::Error),
    #[error("request.object is missing; a Pod CREATE review must carry the Pod being created")]
    NoObject,
    #[error("request.object is not a valid Pod: {0}")]
    BadPod(#[source] serde_json::Error),
}

impl ReviewError {
    /// Stable snake_case code for the JSON error body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::ApiVersion(_) => "wrong_api_version",
            Self::Kind(_) => "wrong_kind",
            Self::NoRequest => "missing_request",
            Self::NoUid => "missing_uid",
            Self::BadRequest(_) => "malformed_request",
            Self::NoObject => "missing_object",
            Self::BadPod(_) => "malformed_pod",
        }
    }
}

/// What was decided, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped(SkipReason),
    Denied(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    InvalidAnnotation,
    InvalidInjectValue,
    InvalidProbe,
    ReservedName,
    ReservedPort,
    ProxyUid,
    NoSpec,
}

impl DenyReason {
    pub const ALL: [DenyReason; 7] = [
        Self::InvalidAnnotation,
        Self::InvalidInjectValue,
        Self::InvalidProbe,
        Self::ReservedName,
        Self::ReservedPort,
        Self::ProxyUid,
        Self::NoSpec,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidAnnotation => "invalid_annotation",
            Self::InvalidInjectValue => "invalid_inject_value",
            Self::InvalidProbe => "invalid_probe",
            Self::ReservedName => "reserved_name",
            Self::ReservedPort => "reserved_port",
            Self::ProxyUid => "proxy_uid",
            Self::NoSpec => "no_spec",
        }
    }

    fn of(error: &InjectError) -> Self {
        match error {
            InjectError::Annotation(_) => Self::InvalidAnnotation,
            InjectError::Probe(_) => Self::InvalidProbe,
            InjectError::ReservedName { .. } => Self::ReservedName,
            InjectError::ReservedPort { .. } => Self::ReservedPort,
            InjectError::ProxyUid { .. } => Self::ProxyUid,
            InjectError::NoSpec => Self::NoSpec,
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct ReviewOutcome {
    /// The AdmissionReview response, JSON.
    pub body: Vec<u8>,
    pub verdict: Verdict,
    /// `namespace/name` (or `generateName…`) of the pod, for logs.
    pub subject: String,
    /// The denial message, for logs.
    pub message: Option<String>,
    /// How long building the patch took, when one was built.
    pub patch_build: Option<Duration>,
}

/// The whole review in one pass: the common case, a Pod CREATE.
#[derive(Deserialize)]
struct FullReview {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest<Pod>>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(borrow)]
    request: Option<&'a RawValue>,
}

/// The fields needed to decide before the object is parsed as a Pod.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestHead<'a> {
    uid: Option<String>,
    kind: GroupVersionKind,
    operation: Operation,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
}

/// The response fields that vary; the envelope is fixed.
struct Response<'a> {
    uid: &'a str,
    allowed: bool,
    status: Option<Status>,
    /// The JSON patch, base64-encoded into the body.
    patch: Option<Vec<u8>>,
    warnings: Vec<String>,
    /// The `decision` audit annotation.
    decision: String,
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: String,
}

/// Writes the AdmissionReview response by hand: the patch is several kilobytes of base64,
/// which needs no escaping, and running it through a JSON string serialiser was a tenth of
/// a review's CPU time. Every other string goes through serde_json.
fn respond(r: Response<'_>) -> Vec<u8> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let patch_len = r
        .patch
        .as_ref()
        .and_then(|p| base64::encoded_len(p.len(), true))
        .unwrap_or(0);
    let mut out = Vec::with_capacity(256 + patch_len);
    out.extend_from_slice(b"{\"apiVersion\":\"");
    out.extend_from_slice(META_API_VERSION_V1.as_bytes());
    out.extend_from_slice(b"\",\"kind\":\"");
    out.extend_from_slice(META_KIND.as_bytes());
    out.extend_from_slice(b"\",\"response\":{\"uid\":");
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, r.uid);
    out.extend_from_slice(if r.allowed {
        b",\"allowed\":true"
    } else {
        b",\"allowed\":false"
    });
    if let Some(status) = &r.status {
        out.extend_from_slice(b",\"status\":");
        let _ = serde_json::to_writer(&mut out, status);
    }
    if let Some(patch) = &r.patch {
        out.extend_from_slice(b",\"patch\":\"");
        let start = out.len();
        out.resize(start + patch_len, 0);
        match engine.encode_slice(patch, &mut out[start..]) {
            Ok(written) => out.truncate(start + written),
            Err(_) => {
                // Only if the length computed above were wrong: encode the slow way.
                out.truncate(start);
                out.extend_from_slice(engine.encode(patch).as_bytes());
            }
        }
        out.extend_from_slice(b"\",\"patchType\":\"JSONPatch\"");
    }
    if !r.warnings.is_empty() {
        out.extend_from_slice(b",\"warnings\":");
        let _ = serde_json::to_writer(&mut out, &r.warnings);
    }
    out.extend_from_slice(b",\"auditAnnotations\":{\"decision\":");
    let _ = serde_json::to_writer(&mut out, &r.decision);
    out.extend_from_slice(b"}}}");
    out
}

fn allowed(uid: &str, decision: String) -> Response<'_> {
    Response {
        uid,
        allowed: true,
        status: None,
        patch: None,
        warnings: Vec::new(),
        decision,
    }
}

/// What the decision needs from a request.
struct Parsed {
    uid: String,
    kind: GroupVersionKind,
    operation: Operation,
    sub_resource: Option<String>,
    namespace: String,
    name: String,
    /// Parsed only when the request is a Pod CREATE (or came in the one-pass parse).
    pod: Option<Pod>,
}

/// One pass over the body when it is a well-formed review whose object parses as a Pod.
fn parse_fast(body: &[u8]) -> Option<Parsed> {
    let review: FullReview = serde_json::from_slice(body).ok()?;
    if review.api_version.as_deref() != Some(META_API_VERSION_V1)
        || review.kind.as_deref() != Some(META_KIND)
    {
        return None;
    }
    let request = review.request?;
    if request.uid.is_empty() {
        return None;
    }
    Some(Parsed {
        uid: request.uid,
        kind: request.kind,
        operation: request.operation,
        sub_resource: request.sub_resource,
        namespace: request.namespace.unwrap_or_default(),
        name: request.name,
        pod: request.object,
    })
}

/// Step by step, so that every malformed input gets the message that fits it, and objects
/// that are not Pods are never parsed as one.
fn parse_checked(body: &[u8]) -> Result<Parsed, ReviewError> {
    let envelope: Envelope<'_> = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    if envelope.api_version.as_deref() != Some(META_API_VERSION_V1) {
        return Err(ReviewError::ApiVersion(envelope.api_version));
    }
    if envelope.kind.as_deref() != Some(META_KIND) {
        return Err(ReviewError::Kind(envelope.kind));
    }
    let raw = envelope.request.ok_or(ReviewError::NoRequest)?;
    if raw.get() == "null" {
        return Err(ReviewError::NoRequest);
    }
    let head: RequestHead<'_> = serde_json::from_str(raw.get()).map_err(ReviewError::BadRequest)?;
    let uid = match head.uid {
        Some(uid) if !uid.is_empty() => uid,
        _ => return Err(ReviewError::NoUid),
    };
    let mut parsed = Parsed {
        uid,
        kind: head.kind,
        operation: head.operation,
        sub_resource: head.sub_resource,
        namespace: head.namespace.unwrap_or_default(),
        name: head.name.unwrap_or_default(),
        pod: None,
    };
    if skip_request(
        &parsed.kind,
        &parsed.operation,
        parsed.sub_resource.as_deref(),
    )
    .is_none()
    {
        let request: AdmissionRequest<Pod> = serde_json::from_str(raw.get()).map_err(|e| {
            // Say whether the Pod or the envelope around it is at fault.
            match head.object.map(|o| serde_json::from_str::<Pod>(o.get())) {
                Some(Err(pod_error)) => ReviewError::BadPod(pod_error),
                _ => ReviewError::BadRequest(e),
            }
        })?;
        parsed.pod = Some(request.object.ok_or(ReviewError::NoObject)?);
    }
    Ok(parsed)
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], settings: &InjectorSettings) -> Result<ReviewOutcome, ReviewError> {
    let parsed = match parse_fast(body) {
        Some(parsed) => parsed,
        None => parse_checked(body)?,
    };
    let uid = parsed.uid.as_str();
    let namespace = &parsed.namespace;
    let mut subject = format!("{namespace}/{}", parsed.name);

    let skipped = |reason: SkipReason, subject: String| ReviewOutcome {
        body: respond(allowed(uid, format!("skipped: {}", reason.as_str()))),
        verdict: Verdict::Skipped(reason),
        subject,
        message: None,
        patch_build: None,
    };
    if let Some(reason) = skip_request(
        &parsed.kind,
        &parsed.operation,
        parsed.sub_resource.as_deref(),
    ) {
        return Ok(skipped(reason, subject));
    }
    // A Pod CREATE always has its pod by now; the one-pass parse may have left it out only
    // when the object was null.
    let pod = parsed.pod.as_ref().ok_or(ReviewError::NoObject)?;
    if parsed.name.is_empty() {
        let generate = pod.metadata.generate_name.as_deref().unwrap_or_default();
        subject = format!("{namespace}/{generate}…");
    }

    let deny = |reason: DenyReason, message: String, subject: String| ReviewOutcome {
        body: respond(Response {
            uid,
            allowed: false,
            status: Some(Status {
                status: "Failure",
                code: 400,
                reason: "BadRequest",
                message: message.clone(),
            }),
            patch: None,
            warnings: Vec::new(),
            decision: format!("denied: {}", reason.as_str()),
        }),
        verdict: Verdict::Denied(reason),
        subject,
        message: Some(message),
        patch_build: None,
    };
    match skip_pod(pod) {
        Err(e) => return Ok(deny(DenyReason::InvalidInjectValue, e.to_string(), subject)),
        Ok(Some(reason)) => return Ok(skipped(reason, subject)),
        Ok(None) => {}
    }

    let started = Instant::now();
    let injection = match build_patch(pod, settings) {
        Ok(injection) => injection,
        Err(e) => return Ok(deny(DenyReason::of(&e), e.to_string(), subject)),
    };
    let patch = serde_json::to_vec(&injection.ops).unwrap_or_default();
    let body = respond(Response {
        uid,
        allowed: true,
        status: None,
        patch: Some(patch),
        warnings: injection.warnings,
        decision: "injected".to_owned(),
    });
    let patch_build = started.elapsed();
    Ok(ReviewOutcome {
        body,
        verdict: Verdict::Injected,
        subject,
        message: None,
        patch_build: Some(patch_build),
    })
}

#[cfg(test)]
#[path = "review_tests.rs"]
mod tests;
