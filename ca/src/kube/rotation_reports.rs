//! Every replica's proxies count: a rotation's `trusting` phase waits until every proxy has
//! confirmed the new bundle, and a replica only hears the proxies whose watches it serves. So
//! each replica publishes what its registry heard (its saved text) in ConfigMap
//! `palisade-ca-proxies-<pod>` in the CA's namespace, and the replica that drives the rotation
//! reads them all before each step and merges them, apart from its own, into its registry.
//! A ConfigMap not written for [`FRESH_FOR`] does not count, and its replica is looked up: a
//! replica whose pod is gone (a rollout, a scale-down) is forgotten, since the proxies it served
//! reconnect elsewhere and report again; a replica whose pod still runs but is silent (cut off
//! from the API server, stuck) still serves proxies nobody can vouch for, so `trusting` waits
//! for it ([`Collected::silent`]). One older than [`DELETE_AFTER`] is deleted by the driver.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::rotation::{Rotation, WatchReport};

pub const REPORTS_PREFIX: &str = "palisade-ca-proxies-";
pub const REPORTS_LABEL: &str = "palisade.dev/ca-proxies";
pub const WRITTEN_AT: &str = "palisade.dev/written-at";
pub const REPORTS_KEY: &str = "proxies.json";
/// How long a replica's report counts after it was written.
pub const FRESH_FOR: i64 = 60;
/// When the driver deletes the report of a replica that stopped writing.
pub const DELETE_AFTER: i64 = 600;
/// A replica rewrites its report at least this often, changed or not, so that it stays fresh.
pub const REWRITE_AT_LEAST: i64 = 30;
/// How often a replica looks whether its report changed.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the other replicas reported, and the reports to delete.
#[derive(Debug, Default, PartialEq)]
pub struct Remote {
    pub reports: Vec<WatchReport>,
    /// Fresh ConfigMaps read (this replica's own excluded).
    pub replicas: usize,
    pub stale: Vec<String>,
    /// Pods of the ConfigMaps neither fresh nor old enough to delete: silent, or gone.
    pub quiet: Vec<String>,
}

/// Reads the reports ConfigMaps at `now` (Unix seconds), leaving out `own` (this replica's).
/// A ConfigMap without a readable write time or report is skipped with a warning: its replica
/// writes it again within [`REWRITE_AT_LEAST`].
pub fn read_reports(configmaps: &[ConfigMap], own: &str, now: i64) -> Remote {
    let mut remote = Remote::default();
    for cm in configmaps {
        let Some(name) = cm.metadata.name.as_deref() else {
            continue;
        };
        if name == own || !name.starts_with(REPORTS_PREFIX) {
            continue;
        }
        let written = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(WRITTEN_AT))
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .map(OffsetDateTime::unix_timestamp);
        let Some(written) = written else {
            tracing::warn!(
                configmap = name,
                "a CA replica's proxy report has no readable {WRITTEN_AT} annotation; ignored"
            );
            continue;
        };
        let age = now - written;
        if age > DELETE_AFTER {
            remote.stale.push(name.to_owned());
            continue;
        }
        if age > FRESH_FOR {
            remote.quiet.push(name[REPORTS_PREFIX.len()..].to_owned());
            continue;
        }
        let text = cm.data.as_ref().and_then(|d| d.get(REPORTS_KEY));
        match text.map(|t| serde_json::from_str::<Vec<WatchReport>>(t)) {
            Some(Ok(reports)) => {
                remote.replicas += 1;
                remote.reports.extend(reports);
            }
            Some(Err(error)) => {
                tracing::warn!(configmap = name, %error, "a CA replica's proxy report is unreadable; ignored")
            }
            None => {
                tracing::warn!(
                    configmap = name,
                    "a CA replica's proxy report has no {REPORTS_KEY}; ignored"
                )
            }
        }
    }
    remote
}

/// The name of `pod`'s reports ConfigMap.
pub fn reports_name(pod: &str) -> String {
    format!("{REPORTS_PREFIX}{pod}")
}

/// What the driver learnt from the replicas' reports.
#[derive(Debug, Default, PartialEq)]
pub struct Collected {
    /// Other replicas whose reports count.
    pub replicas: usize,
    /// Replicas whose pods still run but have not reported for [`FRESH_FOR`]: `trusting` must
    /// not end while they serve proxies nobody heard.
    pub silent: Vec<String>,
}

/// Reads every replica's report into `rotation`'s registry (apart from what it heard itself),
/// looks up the pods of replicas gone quiet, and deletes the reports of replicas gone for long.
pub async fn collect(
    api: &Api<ConfigMap>,
    pods: &Api<Pod>,
    rotation: &Rotation,
    own_pod: &str,
    now: OffsetDateTime,
) -> Result<Collected, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{REPORTS_LABEL}=true")))
        .await?;
    let remote = read_reports(&list.items, &reports_name(own_pod), now.unix_timestamp());
    rotation.registry.set_remote(remote.reports);
    let mut silent = Vec::new();
    for pod in remote.quiet {
        match pods.get_opt(&pod).await {
            // Gone, or on its way out: its proxies reconnect elsewhere.
            Ok(None) => {}
            Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => {}
            Ok(Some(_)) => silent.push(pod),
            // Unknown counts as running: the rotation waits rather than guess.
            Err(error) => {
                tracing::warn!(%pod, %error, "cannot look up a silent CA replica's pod; counting it as running");
                silent.push(pod);
            }
        }
    }
    for name in remote.stale {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(configmap = %name, "deleted the proxy report of a CA replica gone for over 10 minutes")
            }
            Err(error) => {
                tracing::warn!(configmap = %name, %error, "cannot delete a stale proxy report")
            }
        }
    }
    Ok(Collected {
        replicas: remote.replicas,
        silent,
    })
}

/// Writes this replica's report when it changed, or at least every [`REWRITE_AT_LEAST`].
pub struct ReportWriter {
    api: Api<ConfigMap>,
    name: String,
    written: Option<(String, i64)>,
}

impl ReportWriter {
    pub fn new(api: Api<ConfigMap>, pod: &str) -> Self {
        ReportWriter {
            api,
            name: reports_name(pod),
            written: None,
        }
    }

    pub async fn publish(
        &mut self,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<bool, kube::Error> {
        let text = rotation.registry.save();
        let unix = now.unix_timestamp();
        if self
            .written
            .as_ref()
            .is_some_and(|(t, at)| *t == text && unix - at < REWRITE_AT_LEAST)
        {
            return Ok(false);
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([
                    (REPORTS_LABEL.into(), "true".into()),
                    (
                        super::anchors::MANAGED_BY_LABEL.into(),
                        super::anchors::MANAGED_BY.into(),
                    ),
                ])),
                annotations: Some(BTreeMap::from([(
                    WRITTEN_AT.into(),
                    now.format(&Rfc3339).unwrap_or_default(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(REPORTS_KEY.into(), text.clone())])),
            ..Default::default()
        };
        // Server-side apply: one request creates or updates it.
        let params = PatchParams::apply(super::anchors::MANAGED_BY).force();
        self.api
            .patch(&self.name, &params, &Patch::Apply(&cm))
            .await?;
        self.written = Some((text, unix));
        Ok(true)
    }
}
