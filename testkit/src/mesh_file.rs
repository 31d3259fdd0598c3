//! The CA's mesh file (docs/DESIGN.md, "mesh file"): workloads and policies, written as YAML.

use std::path::Path;

/// A mesh file under construction. Workloads are labelled `app: <name>`; policies are YAML
/// list items given verbatim.
#[derive(Clone, Debug)]
pub struct MeshFile {
    trust_domain: String,
    default_policy: String,
    workloads: Vec<String>,
    policies: String,
}

/// `shop/api` on port 8080 admits `shop/web` only.
pub const API_FROM_WEB: &str = "  - metadata: {name: api-from-web, namespace: shop}
    spec: {targetSelector: {matchLabels: {app: api}}, ports: [8080], allow: [{serviceAccounts: [\"shop/web\"]}]}
";

impl MeshFile {
    /// Trust domain `cluster.local`, no workloads, no policies.
    pub fn new(default_policy: &str) -> MeshFile {
        MeshFile {
            trust_domain: "cluster.local".into(),
            default_policy: default_policy.into(),
            workloads: Vec::new(),
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

    /// A workload `name` in `namespace` running as `service_account` at `ip`.
    pub fn workload(
        mut self,
        name: &str,
        namespace: &str,
        service_account: &str,
        ip: &str,
    ) -> MeshFile {
        self.workloads.push(format!(
            "  - {{name: {name}, namespace: {namespace}, serviceAccount: {service_account}, ips: [{ip}], labels: {{app: {name}}}}}\n"
        ));
        self
    }

    /// Policy list items, appended verbatim.
    pub fn policies(mut self, yaml: &str) -> MeshFile {
        self.policies.push_str(yaml);
        self
    }

    pub fn to_yaml(&self) -> String {
        let mut y = format!(
            "trustDomain: {}\ndefaultPolicy: {}\nworkloads:",
            self.trust_domain, self.default_policy
        );
        if self.workloads.is_empty() {
            y.push_str(" []\n");
        } else {
            y.push('\n');
            y.extend(self.workloads.iter().map(String::as_str));
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
