//! The CA API's wire types: certificate issuance, trust bundle, errors, and the mesh watch.
//! docs/ca-api.md describes the same shapes for readers.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::policy::InboundPolicy;
use crate::spiffe::SpiffeId;

pub const PATH_CERTIFICATES: &str = "/v1/certificates";
pub const PATH_TRUST_BUNDLE: &str = "/v1/trust-bundle";
pub const PATH_MESH_WATCH: &str = "/v1/mesh/watch";

/// The audience a service-account token must be bound to.
pub const TOKEN_AUDIENCE: &str = "palisade-ca";
/// Largest request body the CA reads.
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;
/// Shortest and longest certificate lifetime a caller may ask for, in seconds.
pub const MIN_TTL_SECONDS: u64 = 5 * 60;
pub const MAX_TTL_SECONDS: u64 = 24 * 60 * 60;

/// Body of `POST /v1/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// PEM CSR, self-signed by the key the certificate will carry.
    pub csr: String,
    /// Requested lifetime; the CA's `--cert-ttl` when absent. Must lie in 5m..24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// Answer 200 of `POST /v1/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateResponse {
    pub spiffe_id: String,
    /// Leaf PEM first, then the intermediate.
    pub certificate_chain: Vec<String>,
    /// Every root PEM the mesh trusts.
    pub trust_bundle: Vec<String>,
    /// RFC 3339.
    pub expires_at: String,
}

/// Answer of `GET /v1/trust-bundle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundleResponse {
    pub trust_bundle: Vec<String>,
}

/// Every error the CA API answers, as `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // 400
    MalformedRequest,
    InvalidCsr,
    UnsupportedKey,
    ForbiddenCsrContent,
    InvalidTtl,
    InvalidWatchQuery,
    TlsRequired,
    // 401
    MissingToken,
    InvalidToken,
    ExpiredToken,
    WrongAudience,
    MissingClientCertificate,
    UntrustedClientCertificate,
    // 403
    IdentityMismatch,
    // 404, 405
    NotFound,
    MethodNotAllowed,
    // 413
    BodyTooLarge,
    // 429
    RateLimited,
    // 503
    NotReady,
    // 500
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            MalformedRequest | InvalidCsr | UnsupportedKey | ForbiddenCsrContent | InvalidTtl
            | InvalidWatchQuery | TlsRequired => 400,
            MissingToken
            | InvalidToken
            | ExpiredToken
            | WrongAudience
            | MissingClientCertificate
            | UntrustedClientCertificate => 401,
            IdentityMismatch => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            BodyTooLarge => 413,
            RateLimited => 429,
            NotReady => 503,
            Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedRequest => "malformed_request",
            InvalidCsr => "invalid_csr",
            UnsupportedKey => "unsupported_key",
            ForbiddenCsrContent => "forbidden_csr_content",
            InvalidTtl => "invalid_ttl",
            InvalidWatchQuery => "invalid_watch_query",
            TlsRequired => "tls_required",
            MissingToken => "missing_token",
            InvalidToken => "invalid_token",
            ExpiredToken => "expired_token",
            WrongAudience => "wrong_audience",
            MissingClientCertificate => "missing_client_certificate",
            UntrustedClientCertificate => "untrusted_client_certificate",
            IdentityMismatch => "identity_mismatch",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            BodyTooLarge => "body_too_large",
            RateLimited => "rate_limited",
            NotReady => "not_ready",
            Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What was wrong and what to do.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// What a proxy asks the mesh watch about: `?pod_ip=IP&destination=IP&destination=IP…`.
///
/// `pod_ip` names the proxy's own workload, whose inbound policy the stream then carries (the
/// workload must have the identity of the client certificate). Each `destination` asks whether
/// that address is meshed and which identity it must present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchQuery {
    pub pod_ip: Option<IpAddr>,
    pub destinations: Vec<IpAddr>,
    /// SHA-256 fingerprints of the roots the proxy trusts now (`root=`, repeatable): how a
    /// proxy confirms that it installed a bundle during a root rotation.
    pub roots: Vec<String>,
}

/// The most roots one watch may say it trusts.
pub const MAX_WATCH_ROOTS: usize = 8;

/// The most destinations one watch may ask about.
pub const MAX_WATCH_DESTINATIONS: usize = 256;

/// The longest watch message a client accepts: every destination of a full watch a Service
/// of [`MAX_SERVICE_ENDPOINTS`] endpoints, with room to spare.
pub const MAX_WATCH_MESSAGE_BYTES: usize = 16 << 20;

impl WatchQuery {
    pub fn to_query_string(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(ip) = self.pod_ip {
            parts.push(format!("pod_ip={ip}"));
        }
        parts.extend(self.destinations.iter().map(|d| format!("destination={d}")));
        parts.extend(self.roots.iter().map(|r| format!("root={r}")));
        parts.join("&")
    }

    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = WatchQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let ip = || -> Result<IpAddr, String> {
                value
                    .parse()
                    .map_err(|_| format!("{key}={value:?} is not an IP address"))
            };
            match key {
                "pod_ip" if q.pod_ip.is_none() => q.pod_ip = Some(ip()?),
                "pod_ip" => return Err("pod_ip given twice: a proxy watches one workload".into()),
                "destination" => q.destinations.push(ip()?),
                "root" if crate::cert::is_sha256_fingerprint(value) => {
                    q.roots.push(value.to_owned())
                }
                "root" => {
                    return Err(format!(
                        "root={value:?} is not a SHA-256 fingerprint (64 lowercase hex digits)"
                    ));
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: use pod_ip=<own IP>, destination=<IP> and root=<SHA-256> (repeatable)"
                    ));
                }
            }
        }
        if q.pod_ip.is_none() && q.destinations.is_empty() {
            return Err("ask for something: pod_ip=<own IP> and/or destination=<IP>".into());
        }
        if q.destinations.len() > MAX_WATCH_DESTINATIONS {
            return Err(format!(
                "{} destinations asked; at most {MAX_WATCH_DESTINATIONS} per watch: open another watch",
                q.destinations.len()
            ));
        }
        if q.roots.len() > MAX_WATCH_ROOTS {
            return Err(format!(
                "{} roots given; a trust bundle holds at most {MAX_WATCH_ROOTS}",
                q.roots.len()
            ));
        }
        q.destinations.sort();
        q.destinations.dedup();
        q.roots.sort();
        q.roots.dedup();
        Ok(q)
    }
}

/// One line of the mesh watch stream (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchMessage {
    /// `snapshot` for the first message, `update` after; every message is complete for what the
    /// watch asked, so a proxy replaces its state with each one.
    #[serde(rename = "type")]
    pub kind: WatchMessageKind,
    /// Grows with every change of the control plane's state.
    pub version: u64,
    /// The inbound policy of the proxy's own workload, when `pod_ip` was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundPolicy>,
    /// One entry per destination asked, in the order of their addresses.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// Every root the mesh trusts now (PEM): a proxy adopts it at once when it keeps a root the
    /// proxy holds, and confirms it by reopening its watch with the new `root=` fingerprints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_bundle: Vec<String>,
    /// Set while a rotation drains leaves of the previous intermediate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew: Option<RenewRequest>,
}

/// Renew early: a proxy whose leaf was not issued by the intermediate `unless_issued_by` (its
/// SHA-256 fingerprint) renews at a random moment within `within_seconds`, so that a fleet
/// spreads its requests instead of storming the CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub unless_issued_by: String,
    pub within_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMessageKind {
    Snapshot,
    Update,
}

/// Whether an address is a meshed workload, and the identity it must present; or, for a
/// Service address, the Service and its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub address: IpAddr,
    /// Whether the address itself is a meshed workload (false for a Service address: see
    /// `service`, whose endpoints each say whether they are meshed).
    pub meshed: bool,
    /// Present when `meshed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// `namespace/name` of the workload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Present when the address is one of a Service's `clusterIPs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceAnswer>,
}

impl Destination {
    /// An address the control plane knows nothing about: not meshed, pass through.
    pub fn unmeshed(address: IpAddr) -> Self {
        Destination {
            address,
            meshed: false,
            spiffe_id: None,
            workload: None,
            service: None,
        }
    }

    /// A meshed workload's address and the identity it must present.
    pub fn meshed(address: IpAddr, spiffe_id: SpiffeId, workload: Option<String>) -> Self {
        Destination {
            address,
            meshed: true,
            spiffe_id: Some(spiffe_id),
            workload,
            service: None,
        }
    }
}

/// The most endpoints one Service answer carries. A Service with more ready endpoints is
/// answered with a subset of this size chosen per watch by rendezvous hashing (stable when
/// endpoints come and go, and different watches get different subsets, so the load still
/// spreads over every endpoint).
pub const MAX_SERVICE_ENDPOINTS: usize = 256;

/// A Service, as one of its addresses is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAnswer {
    /// `namespace/name`.
    pub name: String,
    /// The Service's ports (what a client may call).
    pub ports: Vec<u16>,
    /// Ready endpoints (at most [`MAX_SERVICE_ENDPOINTS`]), each with the target port of every
    /// Service port it serves.
    pub endpoints: Vec<ServiceEndpoint>,
    /// How many ready endpoints the Service has (more than `endpoints.len()` when subset).
    pub total_endpoints: usize,
}

/// One ready endpoint of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoint {
    pub address: IpAddr,
    /// Service port → target port, for the ports this endpoint serves.
    pub ports: Vec<PortMapping>,
    pub meshed: bool,
    /// Present when `meshed`: the identity this endpoint must present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// `namespace/name` of the workload, when meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub port: u16,
    pub target_port: u16,
}

impl ServiceEndpoint {
    /// The target port for Service port `port`, when this endpoint serves it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|m| m.port == port)
            .map(|m| m.target_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape_is_the_documented_one() {
        let body = ErrorBody::new(ErrorCode::WrongAudience, "use audience palisade-ca");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"wrong_audience","message":"use audience palisade-ca"}}"#
        );
        assert_eq!(ErrorCode::WrongAudience.status(), 401);
        assert_eq!(ErrorCode::BodyTooLarge.status(), 413);
        let json = serde_json::to_value(ErrorCode::UntrustedClientCertificate).unwrap();
        assert_eq!(json, ErrorCode::UntrustedClientCertificate.as_str());
    }

    #[test]
    fn watch_query_round_trip_and_errors() {
        let q = WatchQuery::parse(
            "pod_ip=10.77.0.2&destination=10.77.0.4&destination=10.77.0.3&destination=10.77.0.3",
        )
        .unwrap();
        assert_eq!(q.pod_ip, Some("10.77.0.2".parse().unwrap()));
        assert_eq!(q.destinations.len(), 2);
        assert_eq!(WatchQuery::parse(&q.to_query_string()).unwrap(), q);
        // IPv6, as a dual-stack or IPv6-only proxy asks (colons are fine in a query string).
        let q =
            WatchQuery::parse("pod_ip=fd00:77::2&destination=fd00:96::10&destination=10.96.0.10")
                .unwrap();
        assert_eq!(q.pod_ip, Some("fd00:77::2".parse().unwrap()));
        assert_eq!(q.destinations.len(), 2);
        assert_eq!(WatchQuery::parse(&q.to_query_string()).unwrap(), q);
        // The roots a proxy trusts: fingerprints, sorted and deduplicated.
        let (a, b) = ("a".repeat(64), "0f".repeat(32));
        let q = WatchQuery::parse(&format!("pod_ip=10.77.0.2&root={a}&root={b}&root={a}")).unwrap();
        assert_eq!(q.roots, vec![b.clone(), a.clone()]);
        assert_eq!(WatchQuery::parse(&q.to_query_string()).unwrap(), q);
        let nine = (0..9).map(|i| format!("root={i:064x}")).collect::<Vec<_>>();
        let nine = format!("pod_ip=10.77.0.2&{}", nine.join("&"));
        let upper = format!("pod_ip=10.77.0.2&root={}", "A".repeat(64));
        for (bad, expect) in [
            (nine.as_str(), "at most 8"),
            (upper.as_str(), "not a SHA-256 fingerprint"),
            ("pod_ip=10.77.0.2&root=abc", "not a SHA-256 fingerprint"),
            ("pod_ip=[fd00::2]", "not an IP address"),
            ("destination=fe80::1%eth0", "not an IP address"),
            ("", "ask for something"),
            ("pod_ip=10.0.0.300", "not an IP address"),
            ("pod_ip=1.1.1.1&pod_ip=1.1.1.2", "twice"),
            ("all=true", "unknown parameter"),
            ("destination", "not key=value"),
        ] {
            let err = WatchQuery::parse(bad).unwrap_err();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn certificate_request_refuses_unknown_fields() {
        let err =
            serde_json::from_str::<CertificateRequest>(r#"{"csr":"x","spiffe":"y"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"));
    }
}
