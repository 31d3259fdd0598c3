//! Fills a [`ClusterSnapshot`] through the Kubernetes API: lists and gets only, plus two GETs
//! through the pod proxy to a CA pod's admin port. Decides nothing.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, ResourceExt as _};
use palisade_ca::kube::crd::MeshPolicy;
use palisade_ca_api::contract::CONTROL_PLANE_ADMIN_PORT;

use crate::kube_list::{ProxyGetError, list_each, pod_proxy_get};

use super::snapshot::{
    CaAdmin, ClusterSnapshot, Fetched, ListError, ListedPolicy, Undecoded, pod_ready,
};

/// The MutatingWebhookConfiguration the chart installs.
pub const WEBHOOK_CONFIGURATION: &str = "palisade-injector";
/// The Secret the chart mounts into the injector at `/etc/palisade/webhook`.
pub const INJECTOR_TLS_SECRET: &str = "palisade-injector-tls";
/// The CRD of MeshPolicy.
pub const CRD_NAME: &str = "meshpolicies.palisade.dev";
/// How long the CA's admin port may take to answer through the pod proxy.
pub const CA_ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The label the chart puts on CA pods (`palisade.ca.selectorLabels`).
pub const CA_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "palisade-ca");

/// Why the cluster could not be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "not allowed to list {what} (HTTP 403: {message})\n  fix: grant the read-only ClusterRole of docs/rbac.md (`palisade check`) to the identity of the current kubeconfig context"
    )]
    Forbidden { what: &'static str, message: String },
    #[error(
        "cannot list {what} from the API server: {source}\n  fix: check that the cluster is up and the kubeconfig context is the right one (`kubectl config current-context`, `kubectl get --raw /readyz`)"
    )]
    Unreachable {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
}

fn list_failed(what: &'static str, e: kube::Error) -> FetchError {
    match e {
        kube::Error::Api(status) if status.code == 403 => FetchError::Forbidden {
            what,
            message: status.message,
        },
        source => FetchError::Unreachable { what, source },
    }
}

/// A failed request as one sentence, naming the permission to grant for a 403.
fn describe(e: &kube::Error, request: &str, permission: &str) -> String {
    match e {
        kube::Error::Api(status) if status.code == 403 => format!(
            "{request} was forbidden ({}): grant {permission} (docs/rbac.md, `palisade check`)",
            status.message
        ),
        kube::Error::Api(status) => format!(
            "{request} failed: HTTP {} {}",
            status.code,
            if status.message.is_empty() {
                &status.reason
            } else {
                &status.message
            }
        ),
        other => format!("{request} failed: {other}"),
    }
}

async fn get_opt<K>(api: Api<K>, name: &str, permission: &str) -> Fetched<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| describe(&e, &format!("get {name}"), permission))
}

/// Lists and gets what the checks need. Fails only when namespaces or pods cannot be listed:
/// without them nothing can be checked. Every other failure becomes part of the snapshot, and
/// so one red line.
pub async fn fetch(
    client: &kube::Client,
    namespace: &str,
    now: time::OffsetDateTime,
) -> Result<ClusterSnapshot, FetchError> {
    let mut undecoded = Vec::new();
    let namespaces = list_each::<Namespace>(client, "namespaces", ListParams::default())
        .await
        .map_err(|e| list_failed("namespaces", e))?;
    let namespaces = split(namespaces, &mut undecoded);
    let pods = list_each::<Pod>(client, "pods", ListParams::default())
        .await
        .map_err(|e| list_failed("pods", e))?;
    let pods = split(pods, &mut undecoded);
    let service_accounts =
        list_each::<ServiceAccount>(client, "serviceaccounts", ListParams::default())
            .await
            .map(|list| split(list, &mut undecoded))
            .map_err(|e| describe(&e, "list serviceaccounts", "list on serviceaccounts"));
    let policies = list_policies(client).await;
    let webhook = get_opt(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        WEBHOOK_CONFIGURATION,
        "get on mutatingwebhookconfigurations",
    )
    .await;
    let injector_secret = get_opt(
        Api::<Secret>::namespaced(client.clone(), namespace),
        INJECTOR_TLS_SECRET,
        &format!("get on secrets in namespace {namespace}"),
    )
    .await;
    let crd = get_opt(
        Api::<CustomResourceDefinition>::all(client.clone()),
        CRD_NAME,
        "get on customresourcedefinitions",
    )
    .await;
    let ca_admin = match ready_ca_pod(&pods, namespace) {
        Some(pod) => Some(ca_admin(client, namespace, &pod).await),
        None => None,
    };
    Ok(ClusterSnapshot {
        namespace: namespace.to_owned(),
        now: now.unix_timestamp(),
        namespaces,
        pods,
        service_accounts,
        policies,
        webhook,
        injector_secret,
        crd,
        ca_admin,
        undecoded,
    })
}

/// MeshPolicies, each as it decoded; a 404 means the CRD is not installed.
async fn list_policies(client: &kube::Client) -> Result<Vec<ListedPolicy>, ListError> {
    list_each::<MeshPolicy>(client, "meshpolicies", ListParams::default())
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => ListError::NotServed,
            e => ListError::Other(describe(&e, "list meshpolicies", "list on meshpolicies")),
        })
}

fn split<K>(listed: Vec<Result<K, Undecoded>>, undecoded: &mut Vec<Undecoded>) -> Vec<K> {
    let mut objects = Vec::with_capacity(listed.len());
    for entry in listed {
        match entry {
            Ok(obj) => objects.push(obj),
            Err(e) => undecoded.push(e),
        }
    }
    objects
}

fn ready_ca_pod(pods: &[Pod], namespace: &str) -> Option<String> {
    pods.iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| p.labels().get(CA_POD_LABEL.0).map(String::as_str) == Some(CA_POD_LABEL.1))
        .find(|p| pod_ready(p))
        .map(|p| p.name_any())
}

async fn ca_admin(client: &kube::Client, namespace: &str, pod: &str) -> CaAdmin {
    let get = |path: &'static str| async move {
        pod_proxy_get(
            client,
            namespace,
            pod,
            CONTROL_PLANE_ADMIN_PORT,
            path,
            CA_ADMIN_TIMEOUT,
        )
        .await
        .map_err(|e| match e {
            ProxyGetError::Timeout(t) => format!(
                "GET {path} from the CA's admin port got no answer within {} s",
                t.as_secs()
            ),
            ProxyGetError::Api(e) => describe(
                &e,
                &format!("GET {path} from the CA's admin port"),
                &format!("get on pods/proxy in namespace {namespace}"),
            ),
        })
    };
    CaAdmin {
        pod: format!("{namespace}/{pod}"),
        rotation: get("/rotation").await,
        metrics: get("/metrics").await,
    }
}
