//! The anchors file (`PALISADE_TRUST_ANCHORS`, from the palisade-trust-anchors ConfigMap),
//! polled after start-up. A proxy that missed a whole root rotation (suspended, down) holds
//! only the old root, and the CA now serves from the new one: it cannot even reach the CA.
//! When the ConfigMap changes, the kubelet rewrites the file, and the proxy recovers from it
//! without a restart. The file is a trusted channel: its roots are adopted as they are, not
//! judged like an offer from the CA. The kubelet swaps a symlink, so the content is compared,
//! not the inode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca_api::cert::parse_pem_certs;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use super::rotation::Identity;

/// How often the anchors file is read.
pub const ANCHORS_POLL_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AnchorsFile {
    pub path: PathBuf,
    /// [`ANCHORS_POLL_INTERVAL`] outside tests.
    pub poll: Duration,
    /// The content the trust bundle was built from at start-up: only a change from it counts,
    /// so that roots the CA added since are not taken back by the file they are not yet in.
    pub loaded: Vec<u8>,
}

/// What a read of the file says, compared with the read before.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    /// As before (content or error): nothing to do, nothing to log again.
    Same,
    Unreadable(String),
    /// Read, but holds no usable certificate.
    Unusable(String),
    Roots(Vec<CertificateDer<'static>>),
}

/// The last read of the file. Pure bookkeeping: the caller reads.
#[derive(Debug)]
pub struct AnchorsReader {
    last: Result<Vec<u8>, String>,
}

impl AnchorsReader {
    pub fn new(loaded: Vec<u8>) -> Self {
        AnchorsReader { last: Ok(loaded) }
    }

    pub fn observe(&mut self, read: Result<Vec<u8>, String>) -> Reading {
        if self.last == read {
            return Reading::Same;
        }
        self.last = read.clone();
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(e) => return Reading::Unreadable(e),
        };
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Reading::Unusable("it is not text".into());
        };
        match parse_pem_certs(text) {
            Ok(roots) => Reading::Roots(roots),
            Err(e) => Reading::Unusable(e.to_string()),
        }
    }
}

/// Reads the anchors file every `file.poll` until `shutdown` turns true, and adopts its roots
/// when they change. When the current leaf does not chain to them, it renews at once: the
/// certificate request is authenticated by the service-account token, not by the old roots.
pub async fn watch_anchors(
    file: AnchorsFile,
    identity: Arc<Identity>,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = file.path.display().to_string();
    let mut reader = AnchorsReader::new(file.loaded);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(file.poll) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let read = tokio::fs::read(&file.path).await.map_err(|e| e.to_string());
        match reader.observe(read) {
            Reading::Same => {}
            Reading::Unreadable(error) => tracing::warn!(
                path,
                error,
                "cannot read PALISADE_TRUST_ANCHORS; keeping the current trust bundle"
            ),
            Reading::Unusable(error) => tracing::warn!(
                path,
                error,
                "PALISADE_TRUST_ANCHORS holds no usable certificate; keeping the current trust bundle"
            ),
            Reading::Roots(roots) => adopt(&identity, roots, &path),
        }
    }
}

fn adopt(identity: &Identity, roots: Vec<CertificateDer<'static>>, path: &str) {
    if *identity.bundle.ders() == roots {
        return;
    }
    let count = roots.len();
    if let Err(e) = identity.bundle.replace(roots.clone()) {
        tracing::warn!(path, error = %e,
            "PALISADE_TRUST_ANCHORS is not a usable trust bundle; keeping the current one");
        return;
    }
    tracing::info!(
        path,
        roots = count,
        "PALISADE_TRUST_ANCHORS changed: the trust bundle is replaced"
    );
    identity.early.unless_leaf_chains_to(&roots);
}

#[cfg(test)]
mod tests {
    use palisade_testkit::pki::Authority;

    use super::*;

    #[test]
    fn only_a_change_counts_and_each_problem_is_reported_once() {
        let (a, b) = (Authority::new("a"), Authority::new("b"));
        let mut reader = AnchorsReader::new(a.root_pem().into_bytes());
        assert_eq!(reader.observe(Ok(a.root_pem().into_bytes())), Reading::Same);

        let gone = Err("No such file or directory (os error 2)".to_owned());
        assert!(matches!(
            reader.observe(gone.clone()),
            Reading::Unreadable(_)
        ));
        assert_eq!(reader.observe(gone), Reading::Same);

        let garbage = Ok(b"-----BEGIN CERTIFICATE-----\nnot base64\n".to_vec());
        assert!(matches!(
            reader.observe(garbage.clone()),
            Reading::Unusable(_)
        ));
        assert_eq!(reader.observe(garbage), Reading::Same);
        assert!(matches!(
            reader.observe(Ok(vec![0xff, 0xfe])),
            Reading::Unusable(_)
        ));

        let both = format!("{}{}", a.root_pem(), b.root_pem());
        assert_eq!(
            reader.observe(Ok(both.clone().into_bytes())),
            Reading::Roots(vec![a.root_der(), b.root_der()])
        );
        assert_eq!(reader.observe(Ok(both.into_bytes())), Reading::Same);
        // Back to what was loaded at start-up: a change like any other.
        assert_eq!(
            reader.observe(Ok(a.root_pem().into_bytes())),
            Reading::Roots(vec![a.root_der()])
        );
    }
}
