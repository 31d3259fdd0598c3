//! The Kubernetes mode: key material in a Secret, watches on Pods, Namespaces, MeshPolicies,
//! Services and EndpointSlices that feed the same [`MeshPublisher`] as the file source, and
//! trust-anchor ConfigMaps.
//!
//! The API calls made here are listed in `docs/kubernetes-mode.md`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use palisade_ca_api::policy::DefaultPolicy;
use tokio::sync::watch;

use crate::mesh::MeshPublisher;
use crate::metrics::Metrics;

pub mod anchors;
pub mod crd;
pub mod injector_tls;
pub mod rotation_lease;
pub mod rotation_reports;
pub mod rotation_store;
pub mod secret_keys;
pub mod services;
pub mod state;
pub mod unmeshed;

use crd::MeshPolicy;
use services::{SERVICE_NAME_LABEL, service_info, slice_info};
use state::{ClusterObjects, INJECTED_LABEL, namespace_info, policy_of, workload_of};

/// Changes arriving within this window are published together: well inside the one-second
/// propagation budget, and a rollout of many pods costs a few rebuilds, not one per pod.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the watches tell the rest of the CA.
pub struct WatchOutputs {
    /// True once every watch has listed in full and the state built from them is published.
    pub ready: watch::Receiver<bool>,
    /// The namespaces labelled `palisade.dev/inject=enabled`.
    pub opted_in: watch::Receiver<BTreeSet<String>>,
}

enum Change {
    /// Boxed, as `Service`: Pods and Services are far larger than the other objects.
    Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
    Namespace(Result<watcher::Event<Namespace>, watcher::Error>),
    Policy(Result<watcher::Event<MeshPolicy>, watcher::Error>),
    Service(Box<Result<watcher::Event<Service>, watcher::Error>>),
    Slice(Result<watcher::Event<EndpointSlice>, watcher::Error>),
}

/// Settings of the watches.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub trust_domain: String,
    pub default_policy: DefaultPolicy,
    /// Told of every pod the pod watch sees deleted (the TokenReview cache drops its tokens).
    pub pod_deletions: Option<Arc<crate::auth::kube::PodDeletions>>,
}

/// Starts the watches as one task; returns the readiness and opted-in-namespace channels.
pub fn spawn_watches(
    client: kube::Client,
    settings: WatchSettings,
    publisher: MeshPublisher,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> WatchOutputs {
    let (ready_tx, ready) = watch::channel(false);
    let (opted_tx, opted_in) = watch::channel(BTreeSet::new());
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(&format!("{INJECTED_LABEL}=true")),
    )
    .default_backoff()
    .map(|e| Change::Pod(Box::new(e)));
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(Change::Namespace);
    let policies = watcher(
        Api::<MeshPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(Change::Policy);
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Change::Service(Box::new(e)));
    // Only the slices of Services: others (no owner label) would be ignored anyway.
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .map(Change::Slice);
    let changes = futures_util::stream::select_all([
        pods.boxed(),
        namespaces.boxed(),
        policies.boxed(),
        services.boxed(),
        slices.boxed(),
    ]);
    tasks.spawn(run_watches(
        changes, settings, publisher, metrics, ready_tx, opted_tx, shutdown,
    ));
    WatchOutputs { ready, opted_in }
}

async fn run_watches(
    changes: impl Stream<Item = Change> + Send,
    settings: WatchSettings,
    publisher: MeshPublisher,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    opted_in: watch::Sender<BTreeSet<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = std::pin::pin!(changes);
    let mut objects = ClusterObjects::default();
    let mut publish_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = publish_at;
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { return };
                if let (Change::Pod(event), Some(deletions)) = (&change, &settings.pod_deletions)
                    && let Ok(watcher::Event::Delete(pod)) = event.as_ref()
                    && let Some(uid) = pod.metadata.uid.as_deref()
                {
                    deletions.deleted(uid, time::OffsetDateTime::now_utc().unix_timestamp());
                }
                if apply(&mut objects, change, &metrics) && publish_at.is_none() {
                    publish_at = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
            }
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                publish_at = None;
                if objects.synced() {
                    publisher.publish(objects.mesh_state(&settings.trust_domain, settings.default_policy));
                    metrics.mesh_reload(true);
                    opted_in.send_if_modified(|set| {
                        let now = objects.opted_in();
                        let changed = *set != now;
                        *set = now;
                        changed
                    });
                    if !*ready.borrow() {
                        tracing::info!("Kubernetes watches synced: mesh state published");
                        let _ = ready.send(true);
                    }
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Applies one change; errors are logged and counted, and the objects stay as they were.
fn apply(objects: &mut ClusterObjects, change: Change, metrics: &Metrics) -> bool {
    let failed = |kind: &'static str, error: watcher::Error| {
        metrics.kube_watch_error(kind);
        tracing::warn!(kind, %error, "watch failed; keeping the last good state and retrying with backoff");
        false
    };
    match change {
        Change::Pod(e) => match *e {
            Ok(e) => objects.pods.apply(e, workload_of),
            Err(e) => failed("pods", e),
        },
        Change::Namespace(Ok(e)) => objects.namespaces.apply(e, namespace_info),
        Change::Policy(Ok(e)) => objects.policies.apply(e, policy_of),
        Change::Service(e) => match *e {
            Ok(e) => objects.services.apply(e, service_info),
            Err(e) => failed("services", e),
        },
        Change::Slice(Ok(e)) => objects.endpoint_slices.apply(e, slice_info),
        Change::Namespace(Err(e)) => failed("namespaces", e),
        Change::Policy(Err(e)) => failed("meshpolicies", e),
        Change::Slice(Err(e)) => failed("endpointslices", e),
    }
}
