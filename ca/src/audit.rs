//! The audit trail: one JSON line on stdout per certificate issued. Never a token, key or CSR.

use std::io::Write;

use palisade_ca_api::SpiffeId;
use serde::Serialize;

#[derive(Serialize)]
struct CertificateIssued<'a> {
    audit: &'static str,
    time: String,
    serial: &'a str,
    spiffe_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    not_after: &'a str,
    authenticator: &'a str,
    key_type: &'a str,
}

pub fn certificate_issued(
    serial: &str,
    id: &SpiffeId,
    pod: Option<&str>,
    namespace: &str,
    not_after: &str,
    authenticator: &str,
    key_type: &str,
) {
    let line = CertificateIssued {
        audit: "certificate_issued",
        time: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        serial,
        spiffe_id: id.to_string(),
        pod: pod.map(|p| format!("{namespace}/{p}")),
        not_after,
        authenticator,
        key_type,
    };
    let mut text = serde_json::to_vec(&line).expect("audit lines serialize");
    text.push(b'\n');
    // One write per line so concurrent lines never interleave.
    let _ = std::io::stdout().lock().write_all(&text);
}
