//! The CA's mesh file (docs/DESIGN.md, "mesh file"): workloads, Services and policies, written
//! as YAML.

use std::path::Path;

/// A mesh file under construction. Policies are YAML list items given verbatim.
#[derive(Clone, Debug)]
pub struct MeshFile {
    trust_domain: String,
    default_policy: String,
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: String,
}

/// `shop/api` on port 8080 admits `shop/web` only.
pub const API_FROM_WEB: &str = "  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: [\"shop/web\"]}]}
";

/// A meshed pod of the mesh file. Labelled `app: <name>` unless told otherwise.
#[derive(Clone, Debug)]
pub struct Workload {
    name: String,
    namespace: String,
    service_account: String,
    ips: Vec<String>,
    labels: Vec<(String, String)>,
    ports: Vec<(String, u16)>,
}

impl Workload {
    /// A workload `name` in `namespace` running as `service_account` at `ip`, labelled
    /// `app: <name>`.
    pub fn new(name: &str, namespace: &str, service_account: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            ips: vec![ip.into()],
            labels: vec![("app".into(), name.into())],
            ports: Vec::new(),
        }
    }

    /// Sets label `key` (replacing its value when already set).
    pub fn label(mut self, key: &str, value: &str) -> Workload {
        self.labels.retain(|(k, _)| k != key);
        self.labels.push((key.into(), value.into()));
        self
    }

    /// One more address of the pod (`status.podIPs`: the other family of a dual-stack pod).
    pub fn ip(mut self, ip: &str) -> Workload {
        self.ips.push(ip.into());
        self
    }

    /// A named container port, what a Service's `targetPort: <name>` refers to.
    pub fn port(mut self, name: &str, number: u16) -> Workload {
        self.ports.push((name.into(), number));
        self
    }

    fn to_yaml(&self) -> String {
        let mut y = format!(
            "  - {{name: {}, namespace: {}, serviceAccount: {}, ips: [{}], labels: {{{}}}",
            self.name,
            self.namespace,
            self.service_account,
            // Quoted: an IPv6 address is not a plain YAML scalar everywhere.
            self.ips
                .iter()
                .map(|ip| format!("{ip:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            pairs(&self.labels)
        );
        if !self.ports.is_empty() {
            let ports: Vec<(String, String)> = self
                .ports
                .iter()
                .map(|(n, p)| (n.clone(), p.to_string()))
                .collect();
            y.push_str(&format!(", ports: {{{}}}", pairs(&ports)));
        }
        y.push_str("}\n");
        y
    }
}

/// A Service's `targetPort`: a number, or the name of a port of the selected workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(n: u16) -> TargetPort {
        TargetPort::Number(n)
    }
}

impl From<&str> for TargetPort {
    fn from(name: &str) -> TargetPort {
        TargetPort::Name(name.into())
    }
}

impl std::fmt::Display for TargetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(name) => f.write_str(name),
        }
    }
}

/// A Kubernetes Service of the mesh file. Its endpoints are the workloads its selector picks
/// in its namespace, plus any address given with [`Service::endpoint`] (a hand-made
/// EndpointSlice, for a Service without selector).
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    namespace: String,
    cluster_ips: Vec<String>,
    selector: Vec<(String, String)>,
    ports: Vec<(String, u16, TargetPort)>,
    endpoints: Vec<String>,
}

impl Service {
    /// A headless Service with no selector and no port yet.
    pub fn new(name: &str, namespace: &str) -> Service {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            cluster_ips: Vec::new(),
            selector: Vec::new(),
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    pub fn cluster_ip(mut self, ip: &str) -> Service {
        self.cluster_ips.push(ip.into());
        self
    }

    /// Adds `key: value` to the selector.
    pub fn selector(mut self, key: &str, value: &str) -> Service {
        self.selector.push((key.into(), value.into()));
        self
    }

    /// A port `name` the Service listens on, sent to `target` on the endpoints.
    pub fn port(mut self, name: &str, port: u16, target: impl Into<TargetPort>) -> Service {
        self.ports.push((name.into(), port, target.into()));
        self
    }

    /// An endpoint address listed by hand (`endpoints: [{ip: …}]`).
    pub fn endpoint(mut self, ip: &str) -> Service {
        self.endpoints.push(ip.into());
        self
    }

    fn to_yaml(&self) -> String {
        let mut y = format!(
            "  - name: {}\n    namespace: {}\n    clusterIPs: [{}]\n",
            self.name,
            self.namespace,
            self.cluster_ips.join(", ")
        );
        if !self.selector.is_empty() {
            y.push_str(&format!("    selector: {{{}}}\n", pairs(&self.selector)));
        }
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(name, port, target)| {
                format!("{{name: {name}, port: {port}, targetPort: {target}}}")
            })
            .collect();
        y.push_str(&format!("    ports: [{}]\n", ports.join(", ")));
        if !self.endpoints.is_empty() {
            let eps: Vec<String> = self
                .endpoints
                .iter()
                .map(|ip| format!("{{ip: {ip}}}"))
                .collect();
            y.push_str(&format!("    endpoints: [{}]\n", eps.join(", ")));
        }
        y
    }
}

/// `k: v, k2: v2`, the inside of a YAML flow mapping.
fn pairs(kv: &[(String, String)]) -> String {
    kv.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl MeshFile {
    /// Trust domain `cluster.local`, no workloads, no Services, no policies.
    pub fn new(default_policy: &str) -> MeshFile {
        MeshFile {
            trust_domain: "cluster.local".into(),
            default_policy: default_policy.into(),
            workloads: Vec::new(),
            services: Vec::new(),
            policies: String::new(),
        }
    }

    /// The mesh most API tests use: `shop/web` at 10.77.0.2, `shop/api` at 10.77.0.3, and
    /// [`API_FROM_WEB`] under the default `all-authenticated`.
    pub fn web_and_api() -> MeshFile {
        MeshFile::new("all-authenticated")
            .workload("web", "shop", "web", "10.77.0.2")
            .workload("api", "shop", "api", "10.77.0.3")
            .policies(API_FROM_WEB)
    }

    pub fn trust_domain(mut self, trust_domain: &str) -> MeshFile {
        self.trust_domain = trust_domain.into();
        self
    }

    /// A workload `name` in `namespace` running as `service_account` at `ip`, labelled
    /// `app: <name>`.
    pub fn workload(
        self,
        name: &str,
        namespace: &str,
        service_account: &str,
        ip: &str,
    ) -> MeshFile {
        self.add_workload(Workload::new(name, namespace, service_account, ip))
    }

    /// A workload with labels or named ports of its own.
    pub fn add_workload(mut self, workload: Workload) -> MeshFile {
        self.workloads.push(workload);
        self
    }

    pub fn service(mut self, service: Service) -> MeshFile {
        self.services.push(service);
        self
    }

    /// Policy list items, appended verbatim.
    pub fn policies(mut self, yaml: &str) -> MeshFile {
        self.policies.push_str(yaml);
        self
    }

    /// The YAML text. `services:` appears only when there is one, so the file stays what a CA
    /// without Services reads.
    pub fn to_yaml(&self) -> String {
        let mut y = format!(
            "trustDomain: {}\ndefaultPolicy: {}\nworkloads:",
            self.trust_domain, self.default_policy
        );
        if self.workloads.is_empty() {
            y.push_str(" []\n");
        } else {
            y.push('\n');
            y.extend(self.workloads.iter().map(Workload::to_yaml));
        }
        if !self.services.is_empty() {
            y.push_str("services:\n");
            y.extend(self.services.iter().map(Service::to_yaml));
        }
        y.push_str("policies:");
        if self.policies.trim().is_empty() {
            y.push_str(" []\n");
        } else {
            y.push('\n');
            y.push_str(&self.policies);
        }
        y
    }

    /// Writes the file the way an editor or a config tool does: a new file renamed over the
    /// old one, so a watcher never reads half of it.
    pub fn write(&self, path: &Path) {
        let tmp = path.with_extension("yaml.new");
        std::fs::write(&tmp, self.to_yaml()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_services_keeps_its_former_shape() {
        assert_eq!(
            MeshFile::new("deny")
                .workload("web", "shop", "web", "10.77.0.2")
                .to_yaml(),
            "trustDomain: cluster.local\ndefaultPolicy: deny\nworkloads:\n  \
             - {name: web, namespace: shop, serviceAccount: web, ips: [\"10.77.0.2\"], labels: {app: web}}\n\
             policies: []\n"
        );
    }

    #[test]
    fn services_and_named_ports_are_written_as_the_design_shows() {
        let y = MeshFile::new("all-authenticated")
            .add_workload(
                Workload::new("api-1", "shop", "api", "10.77.5.3")
                    .label("app", "api")
                    .port("http", 8080),
            )
            .service(
                Service::new("api", "shop")
                    .cluster_ip("10.96.0.10")
                    .selector("app", "api")
                    .port("http", 80, "http"),
            )
            .service(
                Service::new("legacy", "shop")
                    .cluster_ip("10.96.0.20")
                    .port("http", 80, 8080)
                    .endpoint("10.77.5.9"),
            )
            .to_yaml();
        assert!(y.contains(
            "  - {name: api-1, namespace: shop, serviceAccount: api, ips: [\"10.77.5.3\"], \
             labels: {app: api}, ports: {http: 8080}}\n"
        ));
        assert!(y.contains(
            "services:\n  - name: api\n    namespace: shop\n    clusterIPs: [10.96.0.10]\n    \
             selector: {app: api}\n    ports: [{name: http, port: 80, targetPort: http}]\n"
        ));
        assert!(y.contains(
            "  - name: legacy\n    namespace: shop\n    clusterIPs: [10.96.0.20]\n    \
             ports: [{name: http, port: 80, targetPort: 8080}]\n    endpoints: [{ip: 10.77.5.9}]\n"
        ));
        assert!(y.ends_with("policies: []\n"));
    }
}
