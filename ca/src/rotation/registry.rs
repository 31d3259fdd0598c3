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
    /// What the other CA replicas heard (Kubernetes mode), kept apart from what this one heard
    /// so that it is never saved or published again as this replica's own.
    remote: Mutex<Vec<WatchReport>>,
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

    /// The entries this replica heard itself, as JSON, to keep with the keys (and, in
    /// Kubernetes mode, to tell the replica that drives the rotation).
    pub fn save(&self) -> String {
        serde_json::to_string(&self.local_snapshot()).expect("reports serialize")
    }

    /// Replaces what the other replicas heard.
    pub fn set_remote(&self, reports: Vec<WatchReport>) {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = reports;
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
        let live = |r: &WatchReport| {
            r.leaf_not_after > now
                && r.pod_ip
                    .is_none_or(|ip| state.workload_at(ip).is_some_and(|w| r.owner.holds(w)))
        };
        self.lock().retain(|_, r| live(r));
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(live);
    }

    /// Every entry, this replica's and the other replicas' ([`merge`]), sorted by pod then
    /// identity.
    pub fn snapshot(&self) -> Vec<WatchReport> {
        let local = self.local_snapshot();
        let remote = self
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if remote.is_empty() {
            return local;
        }
        merge(local.into_iter().chain(remote))
    }

    /// What this replica heard itself, sorted by pod then identity.
    fn local_snapshot(&self) -> Vec<WatchReport> {
        let mut all: Vec<WatchReport> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (&a.pod, &a.spiffe_id).cmp(&(&b.pod, &b.spiffe_id)));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WatchReport>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One entry per proxy (pod address, or identity without one) from several replicas' reports.
/// The report of the newer leaf wins. Two reports of the same leaf (the proxy's watch moved
/// from one replica to another, and the first still holds what it heard) keep only the roots
/// both name: a proxy counts as trusting a root only when every replica that heard this leaf
/// heard it trust that root. That can hold a rotation back until the proxy's next leaf; it
/// never counts a proxy that has not confirmed.
pub fn merge(reports: impl IntoIterator<Item = WatchReport>) -> Vec<WatchReport> {
    let mut by_proxy: HashMap<String, WatchReport> = HashMap::new();
    for report in reports {
        let key = match report.pod_ip {
            Some(ip) => ip.to_string(),
            None => report.spiffe_id.clone(),
        };
        match by_proxy.get_mut(&key) {
            Some(held) if held.leaf_not_before > report.leaf_not_before => {}
            Some(held) if held.leaf_not_before == report.leaf_not_before => {
                held.roots.retain(|root| report.roots.contains(root));
            }
            _ => {
                by_proxy.insert(key, report);
            }
        }
    }
    let mut all: Vec<WatchReport> = by_proxy.into_values().collect();
    all.sort_by(|a, b| (&a.pod, &a.spiffe_id).cmp(&(&b.pod, &b.spiffe_id)));
    all
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
    fn other_replicas_reports_merge_newest_leaf_first_and_a_tie_keeps_the_common_roots() {
        let registry = ProxyRegistry::default();
        registry.report(report("10.77.0.2", &["old", "new"], "i1", 100));
        registry.report(report("10.77.0.4", &["old"], "i1", 100));
        let renewed = WatchReport {
            leaf_not_before: 30,
            ..report("10.77.0.3", &["old", "new"], "i1", 100)
        };
        registry.set_remote(vec![
            // Only another replica hears this one.
            report("10.77.0.9", &["old"], "i1", 100),
            // The same leaf as ours, heard before the proxy confirmed: not confirmed yet.
            report("10.77.0.2", &["old"], "i1", 100),
            renewed.clone(),
            // An older leaf of the same proxy loses to the renewed one.
            report("10.77.0.3", &["old"], "i1", 100),
            // The other replica heard it confirm, we did not (yet): not confirmed either.
            report("10.77.0.4", &["old", "new"], "i1", 100),
        ]);
        let all = registry.snapshot();
        let roots: Vec<(String, Vec<String>)> = all
            .iter()
            .map(|r| (r.pod.clone().unwrap(), r.roots.clone()))
            .collect();
        assert_eq!(
            roots,
            vec![
                ("shop/10.77.0.2".into(), vec!["old".into()]),
                ("shop/10.77.0.3".into(), vec!["old".into(), "new".into()]),
                ("shop/10.77.0.4".into(), vec!["old".into()]),
                ("shop/10.77.0.9".into(), vec!["old".into()]),
            ]
        );
        // What other replicas heard is never saved (nor published) as this replica's.
        let saved: Vec<WatchReport> = serde_json::from_str(&registry.save()).unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[0].roots, vec!["old".to_string(), "new".into()]);
    }

    #[test]
    fn pods_that_left_the_mesh_are_forgotten() {
        let registry = ProxyRegistry::default();
        registry.report(report("10.77.0.2", &["old"], "i1", 100));
        registry.prune(&MeshState::default(), 10);
        assert!(registry.snapshot().is_empty());
    }
}
