//! Trust-anchor distribution: ConfigMap `palisade-trust-anchors` (key `ca.pem`) holds the trust
//! bundle in every namespace labelled `palisade.dev/inject=enabled`, so injected proxies can
//! mount it. The CA creates it when a namespace opts in and corrects it when it differs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

pub use palisade_ca_api::contract::{
    TRUST_ANCHORS_CONFIGMAP as CONFIG_MAP_NAME, TRUST_ANCHORS_KEY as BUNDLE_KEY,
};
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "palisade-ca";
/// Failed namespaces are tried again after this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Every ConfigMap is checked again this often, so one deleted by hand comes back.
pub const RESYNC_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error(
        "cannot {verb} ConfigMap {namespace}/{CONFIG_MAP_NAME}: {source} (does the CA's ClusterRole allow configmaps get/create/update?)"
    )]
    Api {
        verb: &'static str,
        namespace: String,
        source: kube::Error,
    },
}

/// The value of `ca.pem`: the bundle's PEM certificates, one after another.
pub fn bundle_text(pems: &[String]) -> String {
    let mut text = pems
        .iter()
        .map(|p| p.trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

/// The ConfigMap as the CA wants it in `namespace`.
pub fn desired(namespace: &str, bundle_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(owned_labels()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(BUNDLE_KEY.into(), bundle_pem.into())])),
        ..Default::default()
    }
}

fn owned_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
        ("app.kubernetes.io/part-of".into(), "palisade".into()),
    ])
}

/// Whether an existing ConfigMap already says what it should.
fn up_to_date(existing: &ConfigMap, bundle_pem: &str) -> bool {
    let labels = existing.metadata.labels.clone().unwrap_or_default();
    existing
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .map(String::as_str)
        == Some(bundle_pem)
        && owned_labels().iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Creates or corrects the ConfigMap in one namespace.
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    bundle_pem: &str,
) -> Result<(), AnchorError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let err = |verb, source| AnchorError::Api {
        verb,
        namespace: namespace.into(),
        source,
    };
    let existing = api
        .get_opt(CONFIG_MAP_NAME)
        .await
        .map_err(|e| err("get", e))?;
    match existing {
        None => {
            api.create(&PostParams::default(), &desired(namespace, bundle_pem))
                .await
                .map_err(|e| err("create", e))?;
            tracing::info!(namespace, "created the trust-anchor ConfigMap");
        }
        Some(cm) if up_to_date(&cm, bundle_pem) => {}
        Some(mut cm) => {
            cm.metadata
                .labels
                .get_or_insert_with(Default::default)
                .extend(owned_labels());
            cm.data
                .get_or_insert_with(Default::default)
                .insert(BUNDLE_KEY.into(), bundle_pem.into());
            // metadata.resourceVersion stays set: a concurrent writer makes this a 409, retried.
            api.replace(CONFIG_MAP_NAME, &PostParams::default(), &cm)
                .await
                .map_err(|e| err("update", e))?;
            tracing::info!(namespace, "updated the trust-anchor ConfigMap");
        }
    }
    Ok(())
}

/// Keeps the ConfigMap right in every opted-in namespace until shutdown, with a bundle that
/// never changes.
pub async fn distribute(
    client: kube::Client,
    bundle_pem: String,
    opted_in: watch::Receiver<BTreeSet<String>>,
    shutdown: watch::Receiver<bool>,
) {
    let (_fixed, bundle) = watch::channel(bundle_pem);
    keep_anchors(client, bundle, String::clone, opted_in, shutdown).await
}

/// Keeps the ConfigMap right in every opted-in namespace until shutdown, following the trust
/// view: during a root rotation it holds both roots, and the new root alone after.
pub async fn distribute_following(
    client: kube::Client,
    trust: watch::Receiver<crate::rotation::TrustView>,
    opted_in: watch::Receiver<BTreeSet<String>>,
    shutdown: watch::Receiver<bool>,
) {
    let text = |view: &crate::rotation::TrustView| bundle_text(&view.bundle_pem);
    keep_anchors(client, trust, text, opted_in, shutdown).await
}

async fn keep_anchors<T>(
    client: kube::Client,
    mut source: watch::Receiver<T>,
    text: impl Fn(&T) -> String,
    mut opted_in: watch::Receiver<BTreeSet<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut bundle_pem = text(&source.borrow_and_update());
    let mut source_open = true;
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    loop {
        let wanted = opted_in.borrow_and_update().clone();
        done.retain(|ns| wanted.contains(ns));
        let mut failed = false;
        for ns in wanted.difference(&done.clone()) {
            // A slow API server must not hold up shutdown: a pass cut short changes nothing.
            let ensured = tokio::select! {
                result = ensure(&client, ns, &bundle_pem) => result,
                _ = shutdown.changed() => return,
            };
            match ensured {
                Ok(()) => {
                    done.insert(ns.clone());
                }
                Err(error) => {
                    failed = true;
                    tracing::warn!(%error, "trust anchors not distributed; will retry");
                }
            }
        }
        tokio::select! {
            changed = opted_in.changed() => if changed.is_err() { return },
            changed = source.changed(), if source_open => match changed {
                Ok(()) => {
                    let now = text(&source.borrow_and_update());
                    if now != bundle_pem {
                        tracing::info!("the trust bundle changed: updating every trust-anchor ConfigMap");
                        bundle_pem = now;
                        done.clear();
                    }
                }
                // Nothing will change it any more: keep the last one.
                Err(_) => source_open = false,
            },
            _ = tokio::time::sleep(RETRY_AFTER), if failed => {}
            _ = resync.tick() => done.clear(),
            _ = shutdown.changed() => return,
        }
    }
}
