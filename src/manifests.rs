//! MeshPolicy manifests as `kubectl apply` takes them: YAML files, several documents each.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use palisade_ca_api::policy::{MeshPolicySpec, NamedPolicy};

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: MeshPolicySpec,
}

#[derive(serde::Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Every MeshPolicy of `paths`; anything else, or one without a namespace, is an error that
/// names the file and the document.
pub fn read_policies(paths: &[PathBuf]) -> anyhow::Result<Vec<NamedPolicy>> {
    let mut policies = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let m: Manifest = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("{} document {i}: not a MeshPolicy", path.display()))?;
            if m.kind != "MeshPolicy" || m.api_version != "palisade.dev/v1alpha1" {
                bail!(
                    "{} document {i}: {} {} is not palisade.dev/v1alpha1 MeshPolicy",
                    path.display(),
                    m.api_version,
                    m.kind
                );
            }
            let ns = m.metadata.namespace.with_context(|| {
                format!(
                    "{} document {i}: metadata.namespace is required",
                    path.display()
                )
            })?;
            policies.push(NamedPolicy {
                name: m.metadata.name,
                namespace: ns,
                spec: m.spec,
            });
        }
    }
    Ok(policies)
}
