//! The audit trail: one JSON line on stdout per certificate issued. Never a token, key or CSR.
//!
//! Lines go out through one writer thread. A request waits (asynchronously) until its line is
//! written before the certificate is handed out, so no issued certificate goes unaudited; but no
//! runtime thread ever blocks on stdout, which is a pipe that can stall (a slow log collector),
//! and lines that queued up while a write was under way go out together in one write.

use std::io::Write;

use palisade_ca_api::SpiffeId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Lines waiting for the writer at most; past this, requests wait for room.
const QUEUE: usize = 4096;
/// Most lines written in one go.
const MAX_BATCH: usize = 256;

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

/// What one certificate's line says.
pub struct Issuance<'a> {
    pub serial: &'a str,
    pub id: &'a SpiffeId,
    pub pod: Option<&'a str>,
    pub namespace: &'a str,
    pub not_after: &'a str,
    pub authenticator: &'a str,
    pub key_type: &'a str,
}

impl Issuance<'_> {
    fn line(&self) -> Vec<u8> {
        let line = CertificateIssued {
            audit: "certificate_issued",
            time: now_rfc3339(),
            serial: self.serial,
            spiffe_id: self.id.to_string(),
            pod: self.pod.map(|p| format!("{}/{p}", self.namespace)),
            not_after: self.not_after,
            authenticator: self.authenticator,
            key_type: self.key_type,
        };
        let mut text = serde_json::to_vec(&line).expect("audit lines serialize");
        text.push(b'\n');
        text
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct Pending {
    line: Vec<u8>,
    written: oneshot::Sender<()>,
}

/// The audit trail's writer. Its thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
}

impl AuditLog {
    pub fn stdout() -> Self {
        Self::writing_to(std::io::stdout())
    }

    pub fn writing_to(out: impl Write + Send + 'static) -> Self {
        let (queue, lines) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("palisade-ca-audit".into())
            .spawn(move || write_lines(lines, out))
            .expect("the audit writer thread starts");
        AuditLog { queue }
    }

    /// Returns once the line has been written.
    pub async fn certificate_issued(&self, issued: &Issuance<'_>) {
        self.write(issued.line()).await;
    }

    /// One move of a root or intermediate rotation between phases.
    pub async fn rotation(&self, t: &crate::rotation::Transition) {
        #[derive(Serialize)]
        struct RotationPhase<'a> {
            audit: &'static str,
            time: String,
            #[serde(flatten)]
            transition: &'a crate::rotation::Transition,
        }
        let line = RotationPhase {
            audit: "rotation_phase",
            time: now_rfc3339(),
            transition: t,
        };
        let mut text = serde_json::to_vec(&line).expect("audit lines serialize");
        text.push(b'\n');
        self.write(text).await;
    }

    async fn write(&self, line: Vec<u8>) {
        let (written, done) = oneshot::channel();
        let pending = Pending { line, written };
        if self.queue.send(pending).await.is_ok() {
            let _ = done.await;
        }
    }
}

fn write_lines(mut lines: mpsc::Receiver<Pending>, mut out: impl Write) {
    let mut batch = Vec::new();
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = lines.blocking_recv() {
        batch.clear();
        let mut next = Some(first);
        while let Some(p) = next {
            batch.extend_from_slice(&p.line);
            waiting.push(p.written);
            next = (waiting.len() < MAX_BATCH)
                .then(|| lines.try_recv().ok())
                .flatten();
        }
        if let Err(error) = out.write_all(&batch).and_then(|()| out.flush()) {
            tracing::error!(%error, lines = waiting.len(), "cannot write audit lines to stdout");
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_line_is_written_whole_before_the_call_returns() {
        let out = Shared::default();
        let log = Arc::new(AuditLog::writing_to(out.clone()));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..500 {
            let (log, id, out) = (log.clone(), id.clone(), out.clone());
            tasks.spawn(async move {
                let serial = format!("{i:032x}");
                log.certificate_issued(&Issuance {
                    serial: &serial,
                    id: &id,
                    pod: Some("web-1"),
                    namespace: "shop",
                    not_after: "2030-01-01T00:00:00Z",
                    authenticator: "local",
                    key_type: "ECDSA P-256",
                })
                .await;
                let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
                assert!(text.contains(&serial), "line {i} not written on return");
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 500);
        assert!(lines.iter().all(|l| l["pod"] == "shop/web-1"));
    }
}
