//! The audit trail: one JSON line per certificate issued, on stdout or appended to a file.
//! Never a token, key or CSR.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

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

/// Where audit lines are written.
#[derive(Debug)]
pub struct AuditLog {
    /// `None`: stdout.
    file: Option<Mutex<std::fs::File>>,
}

impl AuditLog {
    pub fn stdout() -> AuditLog {
        AuditLog { file: None }
    }

    /// Appends to `path`, creating it when absent.
    pub fn file(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AuditLog {
            file: Some(Mutex::new(file)),
        })
    }

    /// `pod` is `namespace/name`, when the token names the pod.
    pub fn certificate_issued(
        &self,
        serial: &str,
        id: &SpiffeId,
        pod: Option<String>,
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
            pod,
            not_after,
            authenticator,
            key_type,
        };
        let mut text = serde_json::to_vec(&line).expect("audit lines serialize");
        text.push(b'\n');
        // One write per line so concurrent lines never interleave.
        let _ = match &self.file {
            None => std::io::stdout().lock().write_all(&text),
            Some(f) => f.lock().unwrap_or_else(|e| e.into_inner()).write_all(&text),
        };
    }
}
