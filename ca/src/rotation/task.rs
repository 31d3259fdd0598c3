//! The task that steps the rotation once a second and writes each move to the audit trail.

use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::Rotation;
use crate::audit::AuditLog;
use crate::mesh::MeshPublisher;

/// Steps `rotation` once a second until shutdown; each move is one audit line.
pub async fn run(
    rotation: Arc<Rotation>,
    publisher: MeshPublisher,
    audit: AuditLog,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_error = String::new();
    if let Some(t) = rotation.take_finished_at_start() {
        audit.rotation(&t).await;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let state = publisher.current().state;
        match rotation.step(&state, OffsetDateTime::now_utc()) {
            Ok(Some(t)) => {
                last_error.clear();
                audit.rotation(&t).await;
            }
            Ok(None) => last_error.clear(),
            Err(error) => {
                let text = error.to_string();
                if text != last_error {
                    tracing::error!(%error, "rotation step failed; retrying every second");
                    last_error = text;
                }
            }
        }
    }
}
