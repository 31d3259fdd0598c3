//! Reading the cluster for the CLI: lists page by page, so a large cluster never arrives as one
//! answer, each object decoded on its own, so one malformed object is reported by name instead
//! of failing the whole list; and `GET`s on a pod's port through the API server's pod proxy.

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, ResourceExt as _};

/// How long the API server may take to answer one request of the CLI (kube's default is
/// nearly five minutes, far too long for a command someone waits on).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A client for the current kubeconfig context (or the pod's service account), each request
/// bounded by [`REQUEST_TIMEOUT`].
pub async fn client() -> Result<kube::Client, String> {
    let mut config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    config.connect_timeout = Some(REQUEST_TIMEOUT);
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Objects per page.
const PAGE: u32 = 500;
/// Pages at most: a list never grows without bound.
const MAX_PAGES: usize = 400;

/// A listed object that does not decode as its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecoded {
    /// The resource, as `pods`.
    pub kind: &'static str,
    /// `namespace/name`, or `name` for a cluster-scoped object.
    pub name: String,
    pub error: String,
}

/// Every object of kind `K` that `params` selects, cluster-wide, each as it decoded.
pub async fn list_each<K>(
    client: &kube::Client,
    kind: &'static str,
    params: ListParams,
) -> Result<Vec<Result<K, Undecoded>>, kube::Error>
where
    K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
{
    let resource = ApiResource::erase::<K>(&());
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let mut params = params.limit(PAGE);
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let page = api.list(&params).await?;
        out.extend(page.items.into_iter().map(|obj| {
            let name = match obj.namespace() {
                Some(ns) => format!("{ns}/{}", obj.name_any()),
                None => obj.name_any(),
            };
            serde_json::to_value(&obj)
                .and_then(serde_json::from_value::<K>)
                .map_err(|e| Undecoded {
                    kind,
                    name,
                    error: e.to_string(),
                })
        }));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
    Err(kube::Error::Service(
        format!("listing {kind} took more than {MAX_PAGES} pages of {PAGE}").into(),
    ))
}

/// Why a `GET` through the pod proxy gave no answer.
#[derive(Debug)]
pub enum ProxyGetError {
    Api(kube::Error),
    Timeout(std::time::Duration),
}

/// `GET <path>` on `port` of pod `namespace/pod`, through the API server's pod proxy
/// (`pods/proxy` get), within `timeout`.
pub async fn pod_proxy_get(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
    timeout: std::time::Duration,
) -> Result<String, ProxyGetError> {
    let uri = pod_proxy_path(namespace, pod, port, path);
    let request = http::Request::get(&uri)
        .body(Vec::new())
        .map_err(|e| ProxyGetError::Api(kube::Error::HttpError(e)))?;
    tokio::time::timeout(timeout, client.request_text(request))
        .await
        .map_err(|_| ProxyGetError::Timeout(timeout))?
        .map_err(ProxyGetError::Api)
}

/// The path of `GET <path>` on a pod's port through the API server's pod proxy.
pub fn pod_proxy_path(namespace: &str, pod: &str, port: u16, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}")
}
