//! The `file` source: a mesh file (YAML), validated with errors that give the path inside the
//! file, and reloaded when it changes. A bad reload keeps the last good state.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_ca_api::policy::{DefaultPolicy, MeshPolicySpec, NamedPolicy};
use palisade_ca_api::spiffe::{validate_namespace, validate_service_account};
use serde::Deserialize;

use super::{Endpoint, MeshPublisher, MeshState, Service, Workload};
use crate::metrics::Metrics;
use palisade_ca_api::wire::PortMapping;

#[derive(Debug, thiserror::Error)]
pub enum MeshFileError {
    #[error("cannot read mesh file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("mesh file {file}: {path}: {message}")]
    Invalid {
        file: PathBuf,
        path: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MeshFile {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    default_policy: DefaultPolicy,
    /// Per-namespace settings (what the `palisade.dev/default-policy` annotation says in a cluster).
    #[serde(default)]
    namespaces: Vec<NamespaceEntry>,
    #[serde(default)]
    workloads: Vec<WorkloadEntry>,
    #[serde(default)]
    policies: Vec<PolicyEntry>,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    default_policy: DefaultPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadEntry {
    name: String,
    namespace: String,
    service_account: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Named container ports, which a Service's `targetPort` may name.
    #[serde(default)]
    ports: BTreeMap<String, u16>,
}

/// A Service of the mesh file: what a Service object and its EndpointSlices say in a cluster.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    namespace: String,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<IpAddr>,
    /// Picks the workloads that are the endpoints; absent or empty for a Service whose
    /// endpoints are listed by hand (`endpoints:`), as with hand-made EndpointSlices.
    #[serde(default)]
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePortEntry>,
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServicePortEntry {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    /// The port itself when absent.
    #[serde(default)]
    target_port: Option<TargetPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    ip: IpAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEntry {
    metadata: Metadata,
    spec: MeshPolicySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    namespace: String,
}

/// Parses and validates a mesh file for a CA of `trust_domain`.
pub fn parse_mesh_file(
    file: &Path,
    text: &str,
    trust_domain: &str,
) -> Result<MeshState, MeshFileError> {
    let invalid = |path: String, message: String| invalid_at(file, path, message);
    let de = serde_yaml::Deserializer::from_str(text);
    let mesh: MeshFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_yaml appends " at line L column C"; keep it, it helps find the spot.
        invalid(
            if path == "." {
                "(top level)".into()
            } else {
                path
            },
            inner,
        )
    })?;
    if let Some(td) = &mesh.trust_domain
        && td != trust_domain
    {
        return Err(invalid(
            "trustDomain".into(),
            format!(
                "{td:?} differs from the CA's --trust-domain {trust_domain:?}: make them equal"
            ),
        ));
    }
    let mut namespace_defaults = HashMap::new();
    for (i, ns) in mesh.namespaces.iter().enumerate() {
        validate_namespace(&ns.name)
            .map_err(|e| invalid(format!("namespaces[{i}].name"), e.to_string()))?;
        namespace_defaults.insert(ns.name.clone(), ns.default_policy);
    }
    let named_ports: Vec<BTreeMap<String, u16>> =
        mesh.workloads.iter().map(|w| w.ports.clone()).collect();
    let workloads = workloads_of(file, mesh.workloads)?;
    let policies = policies_of(file, mesh.policies)?;
    let services = services_of(file, mesh.services, &workloads, &named_ports)?;
    Ok(MeshState::new(
        trust_domain.to_owned(),
        mesh.default_policy,
        namespace_defaults,
        workloads,
        policies,
        services,
    ))
}

/// The mesh file's workloads, checked: valid names, and no address claimed twice.
fn workloads_of(file: &Path, entries: Vec<WorkloadEntry>) -> Result<Vec<Workload>, MeshFileError> {
    let invalid = |path: String, message: String| invalid_at(file, path, message);
    let mut seen_ips: HashMap<IpAddr, usize> = HashMap::new();
    let mut workloads = Vec::with_capacity(entries.len());
    for (i, w) in entries.into_iter().enumerate() {
        validate_namespace(&w.namespace)
            .map_err(|e| invalid(format!("workloads[{i}].namespace"), e.to_string()))?;
        validate_service_account(&w.service_account)
            .map_err(|e| invalid(format!("workloads[{i}].serviceAccount"), e.to_string()))?;
        if w.name.is_empty() {
            return Err(invalid(format!("workloads[{i}].name"), "is empty".into()));
        }
        if let Some((name, _)) = w.ports.iter().find(|(_, port)| **port == 0) {
            return Err(invalid(
                format!("workloads[{i}].ports.{name}"),
                "0 is not a port: use 1..65535".into(),
            ));
        }
        for (j, ip) in w.ips.iter().enumerate() {
            if let Some(other) = seen_ips.insert(*ip, i) {
                return Err(invalid(
                    format!("workloads[{i}].ips[{j}]"),
                    format!(
                        "{ip} is already the address of workloads[{other}]: an address belongs to one workload"
                    ),
                ));
            }
        }
        workloads.push(Workload {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            ips: w.ips,
            labels: w.labels,
        });
    }
    Ok(workloads)
}

/// The mesh file's policies, checked: valid names, unique per namespace, valid selectors, ports.
fn policies_of(file: &Path, entries: Vec<PolicyEntry>) -> Result<Vec<NamedPolicy>, MeshFileError> {
    let invalid = |path: String, message: String| invalid_at(file, path, message);
    let mut policies = Vec::with_capacity(entries.len());
    let mut names = HashMap::new();
    for (i, p) in entries.into_iter().enumerate() {
        validate_namespace(&p.metadata.namespace)
            .map_err(|e| invalid(format!("policies[{i}].metadata.namespace"), e.to_string()))?;
        if p.metadata.name.is_empty() {
            return Err(invalid(
                format!("policies[{i}].metadata.name"),
                "is empty".into(),
            ));
        }
        if let Some(j) = names.insert((p.metadata.namespace.clone(), p.metadata.name.clone()), i) {
            return Err(invalid(
                format!("policies[{i}].metadata"),
                format!("same name and namespace as policies[{j}]"),
            ));
        }
        p.spec
            .target_selector
            .validate()
            .map_err(|m| invalid(format!("policies[{i}].spec.targetSelector"), m))?;
        if let Some(j) = p.spec.ports.iter().position(|port| *port == 0) {
            return Err(invalid(
                format!("policies[{i}].spec.ports[{j}]"),
                "0 is not a port: use 1..65535".into(),
            ));
        }
        policies.push(NamedPolicy {
            name: p.metadata.name,
            namespace: p.metadata.namespace,
            spec: p.spec,
        });
    }
    Ok(policies)
}

/// The mesh file's Services, checked, with their endpoints derived the way the EndpointSlice
/// controller derives them: every address of each workload in the Service's namespace whose
/// labels include the selector, with each named `targetPort` resolved from that workload's
/// `ports` (a workload without the name does not serve that port).
fn services_of(
    file: &Path,
    entries: Vec<ServiceEntry>,
    workloads: &[Workload],
    named_ports: &[BTreeMap<String, u16>],
) -> Result<Vec<Service>, MeshFileError> {
    let invalid = |path: String, message: String| invalid_at(file, path, message);
    let workload_ips: HashMap<IpAddr, usize> = workloads
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.ips.iter().map(move |ip| (*ip, i)))
        .collect();
    let mut cluster_ips: HashMap<IpAddr, usize> = HashMap::new();
    let mut names = HashMap::new();
    let mut services = Vec::with_capacity(entries.len());
    for (i, s) in entries.into_iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        validate_namespace(&s.namespace).map_err(|e| invalid(at("namespace"), e.to_string()))?;
        validate_namespace(&s.name).map_err(|e| {
            invalid(
                at("name"),
                format!("{e} (a Service name follows the same rule as a namespace)"),
            )
        })?;
        if let Some(j) = names.insert((s.namespace.clone(), s.name.clone()), i) {
            return Err(invalid(
                at("name"),
                format!("same name and namespace as services[{j}]"),
            ));
        }
        for (j, ip) in s.cluster_ips.iter().enumerate() {
            if let Some(other) = cluster_ips.insert(*ip, i) {
                return Err(invalid(
                    format!("services[{i}].clusterIPs[{j}]"),
                    format!(
                        "{ip} is already a clusterIP of services[{other}]: an address belongs to one Service"
                    ),
                ));
            }
            if let Some(w) = workload_ips.get(ip) {
                return Err(invalid(
                    format!("services[{i}].clusterIPs[{j}]"),
                    format!(
                        "{ip} is the address of workloads[{w}]: a clusterIP comes from the Service range, never a pod's"
                    ),
                ));
            }
        }
        if s.ports.is_empty() {
            return Err(invalid(
                at("ports"),
                "is empty: list at least one, e.g. [{name: http, port: 80, targetPort: 8080}]"
                    .into(),
            ));
        }
        let mut targets = Vec::with_capacity(s.ports.len());
        for (j, p) in s.ports.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].ports[{j}]{field}");
            if p.port == 0 {
                return Err(invalid(at(".port"), "0 is not a port: use 1..65535".into()));
            }
            if let Some(k) = s.ports[..j].iter().position(|q| q.port == p.port) {
                return Err(invalid(
                    at(".port"),
                    format!("port {} is already services[{i}].ports[{k}]", p.port),
                ));
            }
            if s.ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
                return Err(invalid(
                    at(".name"),
                    "a Service with several ports must name each one (name: http)".into(),
                ));
            }
            let target = p.target_port.clone().unwrap_or(TargetPort::Number(p.port));
            match &target {
                TargetPort::Number(0) => {
                    return Err(invalid(
                        at(".targetPort"),
                        "0 is not a port: use 1..65535 or a workload port name".into(),
                    ));
                }
                TargetPort::Name(n) if n.is_empty() => {
                    return Err(invalid(
                        at(".targetPort"),
                        "is empty: give a number or a workload port name".into(),
                    ));
                }
                TargetPort::Name(n) if s.selector.is_empty() => {
                    return Err(invalid(
                        at(".targetPort"),
                        format!(
                            "{n:?} names a workload port, but the Service has no selector to pick workloads: give a number"
                        ),
                    ));
                }
                _ => {}
            }
            targets.push((p.port, target));
        }
        if !s.selector.is_empty() && !s.endpoints.is_empty() {
            return Err(invalid(
                at("endpoints"),
                "a Service with a selector gets its endpoints from the workloads it picks: remove `endpoints:` or the selector".into(),
            ));
        }
        let mut endpoints = Vec::new();
        if s.selector.is_empty() {
            for (j, e) in s.endpoints.iter().enumerate() {
                if s.endpoints[..j].iter().any(|o| o.ip == e.ip) {
                    return Err(invalid(
                        format!("services[{i}].endpoints[{j}].ip"),
                        format!("{} is listed twice", e.ip),
                    ));
                }
                endpoints.push(Endpoint {
                    address: e.ip,
                    // Names were refused above for a Service without a selector.
                    ports: targets
                        .iter()
                        .filter_map(|(port, t)| match t {
                            TargetPort::Number(n) => Some(PortMapping {
                                port: *port,
                                target_port: *n,
                            }),
                            TargetPort::Name(_) => None,
                        })
                        .collect(),
                });
            }
        } else {
            for (w, ports) in workloads.iter().zip(named_ports) {
                if w.namespace != s.namespace
                    || !s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                {
                    continue;
                }
                let mappings: Vec<PortMapping> = targets
                    .iter()
                    .filter_map(|(port, t)| {
                        let target_port = match t {
                            TargetPort::Number(n) => *n,
                            TargetPort::Name(name) => *ports.get(name)?,
                        };
                        Some(PortMapping {
                            port: *port,
                            target_port,
                        })
                    })
                    .collect();
                if mappings.is_empty() {
                    continue;
                }
                endpoints.extend(w.ips.iter().map(|ip| Endpoint {
                    address: *ip,
                    ports: mappings.clone(),
                }));
            }
        }
        services.push(Service {
            name: s.name,
            namespace: s.namespace,
            cluster_ips: s.cluster_ips,
            ports: s.ports.iter().map(|p| p.port).collect(),
            endpoints,
        });
    }
    Ok(services)
}

fn invalid_at(file: &Path, path: String, message: String) -> MeshFileError {
    MeshFileError::Invalid {
        file: file.into(),
        path,
        message,
    }
}

pub fn load_mesh_file(path: &Path, trust_domain: &str) -> Result<MeshState, MeshFileError> {
    load_mesh_file_as_read(path, trust_domain).map(|(state, _)| state)
}

/// [`load_mesh_file`], also returning the bytes it parsed: what [`reload_loop`] compares
/// against, so that a change made right after the first load is not missed.
pub fn load_mesh_file_as_read(
    path: &Path,
    trust_domain: &str,
) -> Result<(MeshState, Vec<u8>), MeshFileError> {
    let bytes = std::fs::read(path).map_err(|e| MeshFileError::Read(path.into(), e))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| not_utf8(path))?;
    let state = parse_mesh_file(path, text, trust_domain)?;
    Ok((state, bytes))
}

fn not_utf8(path: &Path) -> MeshFileError {
    MeshFileError::Invalid {
        file: path.into(),
        path: "(file)".into(),
        message: "not UTF-8: save the file as UTF-8".into(),
    }
}

/// How often the file is checked for changes: well inside the one-second propagation budget.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Re-reads the mesh file whenever its contents differ from `last` (the bytes the published
/// state came from) and publishes the new state; a file that does not validate is logged and
/// counted, and the last good state stays.
pub async fn reload_loop(
    path: PathBuf,
    trust_domain: String,
    publisher: MeshPublisher,
    metrics: std::sync::Arc<Metrics>,
    last: Vec<u8>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = Some(last);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let Ok(now) = std::fs::read(&path) else {
            continue;
        };
        if last.as_deref() == Some(now.as_slice()) {
            continue;
        }
        last = Some(now.clone());
        let result = std::str::from_utf8(&now)
            .map_err(|_| not_utf8(&path))
            .and_then(|text| parse_mesh_file(&path, text, &trust_domain));
        match result {
            Ok(state) => {
                publisher.publish(state);
                metrics.mesh_reload(true);
                tracing::info!(file = %path.display(), "mesh file reloaded");
            }
            Err(error) => {
                metrics.mesh_reload(false);
                tracing::error!(%error, "mesh file rejected; still serving the last good state");
            }
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
