//! Where the policy tools read the mesh ([`MeshSource`]): a mesh file; MeshPolicy manifests
//! around one target pod; or the running cluster, read once — the objects the CA watches
//! (meshed Pods, Namespaces, MeshPolicies, Services, EndpointSlices), converted by the CA's own
//! functions into the same `MeshState`, so that `policy explain --kube` and `policy suggest
//! --kube` answer as the proxies decide. The trust domain and default policy come from the
//! CA's Deployment, unless given. With `--kube`, `suggest` also asks the proxies for what they
//! counted ([`proxy_metrics`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::Event;
use palisade_ca::kube::crd::MeshPolicy;
use palisade_ca::kube::services::{SERVICE_NAME_LABEL, service_info, slice_info};
use palisade_ca::kube::state::{
    ClusterObjects, INJECTED_LABEL, Tracked, namespace_info, policy_of, workload_of,
};
use palisade_ca::mesh::{MeshState, Workload};
use palisade_ca_api::policy::DefaultPolicy;
use serde::de::DeserializeOwned;

use crate::kube_list::{ProxyGetError, Undecoded, list_each, pod_proxy_get};

/// The CA's Deployment and container, as the chart names them.
const CA_DEPLOYMENT: &str = "palisade-ca";
const CA_CONTAINER: &str = "palisade-ca";
/// The CA's defaults (`palisade-ca serve`), for a Deployment that does not set them.
const CA_DEFAULT_TRUST_DOMAIN: &str = palisade_ca_api::spiffe::DEFAULT_TRUST_DOMAIN;
const CA_DEFAULT_POLICY: DefaultPolicy = DefaultPolicy::AllAuthenticated;

/// Where a policy tool reads the mesh: a mesh file, the live cluster, or MeshPolicy manifests.
#[derive(clap::Args, Debug)]
pub struct MeshSource {
    /// A mesh file (as `palisade-ca serve --mesh-file` reads).
    #[arg(
        long,
        required_unless_present_any = ["kube", "policies"],
        conflicts_with_all = ["kube", "policies"]
    )]
    mesh_file: Option<PathBuf>,
    /// Read the mesh from the cluster of the current kubeconfig, as the CA builds it (meshed
    /// Pods, Namespaces, MeshPolicies, Services, EndpointSlices; read-only access).
    #[arg(long, conflicts_with = "policies")]
    kube: bool,
    /// MeshPolicy manifests (YAML, several documents each; repeatable), before they are
    /// applied. The target pod is then known only by its name and --labels.
    #[arg(long)]
    policies: Vec<PathBuf>,
    /// With --policies: the target pod's labels, `k=v,k=v`.
    #[arg(long, requires = "policies", default_value = "")]
    labels: String,
    /// With --kube: the namespace of Palisade's CA, whose Deployment says the trust domain and
    /// default policy.
    #[arg(long, default_value = "palisade-system", requires = "kube")]
    ca_namespace: String,
    /// Trust domain [default: cluster.local for a mesh file or manifests; the CA's with
    /// --kube].
    #[arg(long)]
    trust_domain: Option<String>,
    /// With --kube or --policies: the mesh's default policy (deny, all-authenticated, all)
    /// [default: the CA's with --kube; all-authenticated with --policies].
    #[arg(long, value_parser = parse_default_policy)]
    default_policy: Option<DefaultPolicy>,
}

fn parse_default_policy(text: &str) -> Result<DefaultPolicy, String> {
    text.parse()
}

impl MeshSource {
    /// Whether the mesh is MeshPolicy manifests: no workloads, no addresses.
    pub fn is_manifests(&self) -> bool {
        !self.policies.is_empty()
    }

    /// The mesh, from the file or the cluster. With manifests, use
    /// [`load_with_target`](Self::load_with_target).
    pub fn load(&self) -> anyhow::Result<MeshState> {
        if self.is_manifests() {
            bail!(
                "--policies holds policies but no workloads: give --mesh-file or --kube for the workloads"
            );
        }
        if let Some(path) = &self.mesh_file {
            if self.default_policy.is_some() {
                bail!("--default-policy: a mesh file says its own defaultPolicy");
            }
            let td = self
                .trust_domain
                .as_deref()
                .unwrap_or(CA_DEFAULT_TRUST_DOMAIN);
            return Ok(palisade_ca::mesh::file::load_mesh_file(path, td)?);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async {
            let client = client().await?;
            let settings = read_ca_settings(
                &client,
                &self.ca_namespace,
                self.trust_domain.as_deref(),
                self.default_policy,
            )
            .await?;
            let (state, skipped) = mesh_state(&client, &settings).await?;
            for u in skipped {
                eprintln!(
                    "palisade: skipped {} {}: it does not decode ({}); the CA ignores it too",
                    u.kind, u.name, u.error
                );
            }
            Ok(state)
        })
    }

    /// Whether the mesh is read from the cluster.
    pub fn is_kube(&self) -> bool {
        self.kube
    }

    /// With --kube: what every meshed proxy (in `namespace`, or all) counted, asked through
    /// the API server.
    pub fn proxy_metrics(&self, namespace: Option<&str>) -> anyhow::Result<ProxyMetrics> {
        if !self.kube {
            bail!("only --kube can ask the proxies themselves: give --metrics ns/pod=FILE…");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async { proxy_metrics(&client().await?, namespace).await })
    }

    /// The mesh with `namespace/name` in it: with manifests, a pod of that name with --labels
    /// under the manifests' policies; otherwise [`load`](Self::load).
    pub fn load_with_target(&self, namespace: &str, name: &str) -> anyhow::Result<MeshState> {
        if !self.is_manifests() {
            return self.load();
        }
        palisade_ca_api::spiffe::validate_namespace(namespace)
            .with_context(|| format!("--to: {namespace:?} is not a namespace"))?;
        let mut labels = BTreeMap::new();
        for pair in self.labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--labels: {pair:?} is not k=v"))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let target = Workload {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: "default".into(),
            ips: Vec::new(),
            labels,
        };
        Ok(MeshState::new(
            self.trust_domain
                .clone()
                .unwrap_or_else(|| CA_DEFAULT_TRUST_DOMAIN.into()),
            self.default_policy.unwrap_or(CA_DEFAULT_POLICY),
            Default::default(),
            vec![target],
            crate::manifests::read_policies(&self.policies)?,
            Vec::new(),
        ))
    }
}

/// How long one proxy's `/metrics` may take through the pod proxy, and proxies asked at once.
const PROXY_METRICS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const PROXY_METRICS_AT_ONCE: usize = 8;

/// What the proxies counted: `(ns/pod, /metrics text)` of each that answered, and one line for
/// each meshed pod that was not asked or did not answer, with why.
pub struct ProxyMetrics {
    pub answered: Vec<(String, String)>,
    pub missing: Vec<String>,
}

/// Every meshed pod's `/metrics` (its proxy's admin port, through the API server's pod proxy),
/// in `namespace` or in every namespace. A proxy answers remote callers only when its pod is
/// annotated `palisade.dev/admin-remote-metrics: "true"` (as Prometheus needs too); the others
/// are listed as missing, with the fix.
pub async fn proxy_metrics(
    client: &kube::Client,
    namespace: Option<&str>,
) -> anyhow::Result<ProxyMetrics> {
    use futures_util::StreamExt as _;
    let mut params = ListParams::default().labels(&format!("{INJECTED_LABEL}=true"));
    if let Some(ns) = namespace {
        params = params.fields(&format!("metadata.namespace={ns}"));
    }
    let mut missing = Vec::new();
    let mut skipped = Vec::new();
    let pods: Vec<Pod> = list_all(client, "pods", params, &mut skipped).await?;
    missing.extend(
        skipped
            .into_iter()
            .map(|u| format!("{}: it does not decode ({})", u.name, u.error)),
    );
    let remote = palisade_ca_api::contract::annotations::ADMIN_REMOTE_METRICS;
    let mut asked = Vec::new();
    for pod in &pods {
        let Some(w) = workload_of(pod) else { continue };
        let target = format!("{}/{}", w.namespace, w.name);
        if pod.annotations().get(remote).map(String::as_str) != Some("true") {
            missing.push(format!(
                "{target}: its proxy answers /metrics to loopback only; annotate the pod {remote}: \"true\" (as for Prometheus), or collect /metrics inside it and give --metrics"
            ));
            continue;
        }
        asked.push((w.namespace, w.name, target));
    }
    let answers: Vec<_> = futures_util::stream::iter(asked)
        .map(|(ns, name, target)| async move {
            let port = palisade_ca_api::contract::PROXY_ADMIN_PORT;
            let got =
                pod_proxy_get(client, &ns, &name, port, "/metrics", PROXY_METRICS_TIMEOUT).await;
            (target, got)
        })
        .buffer_unordered(PROXY_METRICS_AT_ONCE)
        .collect()
        .await;
    let mut answered = Vec::new();
    for (target, got) in answers {
        match got {
            Ok(text) => answered.push((target, text)),
            Err(ProxyGetError::Timeout(t)) => missing.push(format!(
                "{target}: no answer within {} s through the pod proxy",
                t.as_secs()
            )),
            Err(ProxyGetError::Api(kube::Error::Api(status))) if status.code == 403 => {
                missing.push(format!(
                    "{target}: GET /metrics through the pod proxy was forbidden ({}): grant get on pods/proxy (docs/rbac.md)",
                    status.message
                ))
            }
            Err(ProxyGetError::Api(e)) => missing.push(format!(
                "{target}: GET /metrics through the pod proxy failed: {e}"
            )),
        }
    }
    answered.sort();
    missing.sort();
    Ok(ProxyMetrics { answered, missing })
}

/// How the CA in the cluster is configured, as far as policy is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub trust_domain: String,
    pub default_policy: DefaultPolicy,
}

/// Reads the trust domain (`--trust-domain`) and default policy (`--default-policy` or
/// `PALISADE_DEFAULT_POLICY`) from the CA Deployment's container. Pure.
pub fn ca_settings(deployment: &Deployment) -> anyhow::Result<CaSettings> {
    let name = format!(
        "Deployment {}/{}",
        deployment.namespace().unwrap_or_default(),
        deployment.name_any()
    );
    let container = deployment
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == CA_CONTAINER))
        .with_context(|| format!("{name} has no container {CA_CONTAINER}"))?;
    let args = container.args.clone().unwrap_or_default();
    let flag = |flag: &str| -> Option<String> {
        let inline = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, a)| {
            if a == flag {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(&inline).map(str::to_owned)
            }
        })
    };
    let env = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "PALISADE_DEFAULT_POLICY")
        .and_then(|e| e.value.clone());
    let default_policy = match flag("--default-policy").or(env) {
        Some(v) => v.parse().map_err(|e| {
            anyhow::anyhow!("{name}: its default policy {v:?} is not one the CA accepts ({e})")
        })?,
        None => CA_DEFAULT_POLICY,
    };
    Ok(CaSettings {
        trust_domain: flag("--trust-domain").unwrap_or_else(|| CA_DEFAULT_TRUST_DOMAIN.into()),
        default_policy,
    })
}

/// Every object of a list, page by page; those that do not decode are set aside in `skipped`.
async fn list_all<K>(
    client: &kube::Client,
    kind: &'static str,
    params: ListParams,
    skipped: &mut Vec<Undecoded>,
) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource<DynamicType = ()> + DeserializeOwned,
{
    let listed = list_each::<K>(client, kind, params)
        .await
        .map_err(|e| api_error(e, kind))?;
    let mut out = Vec::with_capacity(listed.len());
    for item in listed {
        match item {
            Ok(obj) => out.push(obj),
            Err(e) => skipped.push(e),
        }
    }
    Ok(out)
}

/// An API error as what went wrong and what to do.
fn api_error(error: kube::Error, plural: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 403 => anyhow::anyhow!(
            "the cluster refused to list {plural} ({}): your account needs the read-only role in docs/rbac.md",
            status.message
        ),
        kube::Error::Api(status) if status.code == 404 && plural == "meshpolicies" => {
            anyhow::anyhow!(
                "the cluster has no MeshPolicy resource: install Palisade's CRD (the chart's crds/)"
            )
        }
        _ => anyhow::anyhow!(
            "cannot list {plural} from the cluster of the current kubeconfig: {error}"
        ),
    }
}

/// The objects of one kind as the CA's watch holds them after a complete list.
fn tracked<K: ResourceExt, V>(items: Vec<K>, convert: impl Fn(&K) -> Option<V>) -> Tracked<V> {
    let mut t = Tracked::default();
    t.apply(Event::Init, &convert);
    for item in items {
        t.apply(Event::InitApply(item), &convert);
    }
    t.apply(Event::InitDone, &convert);
    t
}

/// The CA's settings from its Deployment in `ca_namespace`; `given` values win.
pub async fn read_ca_settings(
    client: &kube::Client,
    ca_namespace: &str,
    trust_domain: Option<&str>,
    default_policy: Option<DefaultPolicy>,
) -> anyhow::Result<CaSettings> {
    if let (Some(td), Some(dp)) = (trust_domain, default_policy) {
        return Ok(CaSettings {
            trust_domain: td.to_owned(),
            default_policy: dp,
        });
    }
    let api: Api<Deployment> = Api::namespaced(client.clone(), ca_namespace);
    let deployment = api
        .get_opt(CA_DEPLOYMENT)
        .await
        .map_err(|e| api_error(e, "deployments"))?
        .with_context(|| {
            format!(
                "no Deployment {ca_namespace}/{CA_DEPLOYMENT}, whose flags say the trust domain and default policy: give --ca-namespace, or --trust-domain and --default-policy"
            )
        })?;
    let found = ca_settings(&deployment)?;
    Ok(CaSettings {
        trust_domain: trust_domain.map_or(found.trust_domain, str::to_owned),
        default_policy: default_policy.unwrap_or(found.default_policy),
    })
}

/// The mesh as the CA builds it from the cluster's objects now, and the objects that did not
/// decode (the CA's watch would not see them either).
pub async fn mesh_state(
    client: &kube::Client,
    settings: &CaSettings,
) -> anyhow::Result<(MeshState, Vec<Undecoded>)> {
    let mut skipped = Vec::new();
    let meshed = ListParams::default().labels(&format!("{INJECTED_LABEL}=true"));
    let pods: Vec<Pod> = list_all(client, "pods", meshed, &mut skipped).await?;
    let all = ListParams::default;
    let namespaces: Vec<Namespace> = list_all(client, "namespaces", all(), &mut skipped).await?;
    let policies: Vec<MeshPolicy> = list_all(client, "meshpolicies", all(), &mut skipped).await?;
    let services: Vec<Service> = list_all(client, "services", all(), &mut skipped).await?;
    let slices: Vec<EndpointSlice> = list_all(
        client,
        "endpointslices",
        ListParams::default().labels(SERVICE_NAME_LABEL),
        &mut skipped,
    )
    .await?;
    let objects = ClusterObjects {
        pods: tracked(pods, workload_of),
        namespaces: tracked(namespaces, namespace_info),
        policies: tracked(policies, policy_of),
        services: tracked(services, service_info),
        endpoint_slices: tracked(slices, slice_info),
    };
    let state = objects.mesh_state(&settings.trust_domain, settings.default_policy);
    Ok((state, skipped))
}

/// A client for the current kubeconfig, with the error an operator can act on.
pub async fn client() -> anyhow::Result<kube::Client> {
    crate::kube_list::client().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach a cluster: no usable kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster account ({e}); or give --mesh-file"
        )
    })
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
