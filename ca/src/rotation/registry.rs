//! What each proxy holds, as its mesh watches report it: the roots it trusts (the watch's
//! `root=` fingerprints), and its current leaf (the watch connection's client certificate) —
//! which intermediate issued it and when it expires. One entry per watched pod address (or per
//! identity for a watch without one), replaced by the latest watch it opens; entries go when
//! their leaf expires or their pod is no longer a workload of that identity. The size is
//! bounded by the mesh: a watch with `pod_ip` is accepted only for that pod's own identity.
//! During a rotation the entries are saved with the keys, so that a restarted CA still waits
//! for the proxies it heard before.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::mesh::MeshState;
use crate::mesh::watch::Owner;

/// What one watch said when it opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchReport {
    pub pod_ip: Option<IpAddr>,
    /// `namespace/name` of the workload at `pod_ip`, when known.
    pub pod: Option<String>,
    pub spiffe_id: String,
    pub owner: Owner,
    /// Fingerprints of the roots the proxy trusts.
    pub roots: Vec<String>,
    /// Fingerprint of the intermediate that issued its leaf, when it is one of ours.
    pub leaf_issuer: Option<String>,
    /// Unix seconds.
    pub leaf_not_before: i64,
    /// Unix seconds.
    pub leaf_not_after: i64,
}

#[derive(Debug, Default)]
pub struct ProxyRegistry {
    entries: Mutex<HashMap<String, WatchReport>>,
    /// Grows with every change, so a saver knows when there is something new.
    changes: std::sync::atomic::AtomicU64,
}

impl ProxyRegistry {
    /// Records a watch. A report never replaces one made with a newer leaf: a watch still
    /// open with the leaf the proxy held before cannot undo what its renewed leaf said.
    pub fn report(&self, report: WatchReport) {
        let key = match report.pod_ip {
            Some(ip) => ip.to_string(),
            None => report.spiffe_id.clone(),
        };
        let mut entries = self.lock();
        if entries
            .get(&key)
            .is_some_and(|e| e.leaf_not_before > report.leaf_not_before)
        {
            return;
        }
        entries.insert(key, report);
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The entries as JSON, to keep with the keys.
    pub fn save(&self) -> String {
        serde_json::to_string(&self.snapshot()).expect("reports serialize")
    }

    /// Entries saved by [`ProxyRegistry::save`]; unreadable text is ignored with a warning
    /// (the proxies report again when they reconnect).
    pub fn restore(&self, text: &str) {
        match serde_json::from_str::<Vec<WatchReport>>(text) {
            Ok(reports) => reports.into_iter().for_each(|r| self.report(r)),
            Err(error) => {
                tracing::warn!(%error, "the saved proxy reports are unreadable; waiting for proxies to report again")
            }
        }
    }

    /// Drops entries whose leaf has expired or whose pod is gone (or now another identity's).
    pub fn prune(&self, state: &MeshState, now: i64) {
        self.lock().retain(|_, r| {
            r.leaf_not_after > now
                && r.pod_ip
                    .is_none_or(|ip| state.workload_at(ip).is_some_and(|w| r.owner.holds(w)))
        });
    }

    /// Every entry, sorted by pod then identity.
    pub fn snapshot(&self) -> Vec<WatchReport> {
        let mut all: Vec<WatchReport> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (&a.pod, &a.spiffe_id).cmp(&(&b.pod, &b.spiffe_id)));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WatchReport>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The proxies that do not yet trust every root of `bundle`.
pub fn lagging<'a>(reports: &'a [WatchReport], bundle: &[String]) -> Vec<&'a WatchReport> {
    reports
        .iter()
        .filter(|r| !bundle.iter().all(|root| r.roots.contains(root)))
        .collect()
}

/// The proxies whose leaf was not issued by `issuing` (the intermediate's fingerprint).
pub fn on_previous<'a>(reports: &'a [WatchReport], issuing: &str) -> Vec<&'a WatchReport> {
    reports
        .iter()
        .filter(|r| r.leaf_issuer.as_deref() != Some(issuing))
        .collect()
}

/// When the first proxy's certificate runs out if the CA stays down from now.
pub fn mesh_expiry(reports: &[WatchReport]) -> Option<i64> {
    reports.iter().map(|r| r.leaf_not_after).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ip: &str, roots: &[&str], issuer: &str, not_after: i64) -> WatchReport {
        WatchReport {
            pod_ip: Some(ip.parse().unwrap()),
            pod: Some(format!("shop/{ip}")),
            spiffe_id: "spiffe://td/ns/shop/sa/web".into(),
            owner: Owner {
                namespace: "shop".into(),
                service_account: "web".into(),
            },
            roots: roots.iter().map(|r| r.to_string()).collect(),
            leaf_issuer: Some(issuer.into()),
            leaf_not_before: 0,
            leaf_not_after: not_after,
        }
    }

    #[test]
    fn the_latest_watch_of_a_pod_replaces_its_entry_and_expired_leaves_go() {
        let registry = ProxyRegistry::default();
        registry.report(report("10.77.0.2", &["old"], "i1", 100));
        registry.report(report("10.77.0.2", &["old", "new"], "i1", 200));
        registry.report(report("10.77.0.3", &["old"], "i1", 50));
        let all = registry.snapshot();
        assert_eq!(all.len(), 2);
        let bundle = ["old".to_string(), "new".to_string()];
        let late: Vec<_> = lagging(&all, &bundle)
            .iter()
            .map(|r| r.pod.clone())
            .collect();
        assert_eq!(late, vec![Some("shop/10.77.0.3".into())]);
        assert_eq!(mesh_expiry(&all), Some(50));
        assert_eq!(on_previous(&all, "i2").len(), 2);
        assert_eq!(on_previous(&all, "i1").len(), 0);
    }

    #[test]
    fn an_older_leaf_never_replaces_a_newer_one_and_reports_survive_a_save() {
        let registry = ProxyRegistry::default();
        let newer = WatchReport {
            leaf_not_before: 20,
            ..report("10.77.0.2", &["old", "new"], "i2", 100)
        };
        registry.report(newer.clone());
        registry.report(report("10.77.0.2", &["old"], "i1", 90));
        assert_eq!(registry.snapshot(), vec![newer.clone()]);
        let restored = ProxyRegistry::default();
        restored.restore(&registry.save());
        assert_eq!(restored.snapshot(), vec![newer]);
        restored.restore("not json");
        assert_eq!(restored.snapshot().len(), 1);
    }

    #[test]
    fn pods_that_left_the_mesh_are_forgotten() {
        let registry = ProxyRegistry::default();
        registry.report(report("10.77.0.2", &["old"], "i1", 100));
        registry.prune(&MeshState::default(), 10);
        assert!(registry.snapshot().is_empty());
    }
}
