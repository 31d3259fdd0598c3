//! `palisade policy check`: whether a caller may reach a workload and port, under a mesh file or
//! a set of MeshPolicy manifests. The same evaluation the proxy runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::policy::{
    Caller, DefaultPolicy, InboundPolicy, evaluate_inbound, policies_selecting,
};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// A mesh file (as `palisade-ca serve --mesh-file` reads).
    #[arg(long, conflicts_with = "policies")]
    mesh_file: Option<PathBuf>,
    /// MeshPolicy manifests (YAML, several documents allowed); repeatable.
    #[arg(long)]
    policies: Vec<PathBuf>,
    /// The caller: a SPIFFE ID, `ns/sa`, or `plaintext`.
    #[arg(long)]
    from: String,
    /// The target: `ns/name` of a workload (mesh file) or `ns` with --labels (manifests).
    #[arg(long)]
    to: String,
    /// Target port.
    #[arg(long)]
    port: u16,
    /// Target labels, `k=v,k=v` (with --policies).
    #[arg(long, default_value = "")]
    labels: String,
    /// Default policy when no MeshPolicy selects the target (with --policies).
    #[arg(long, default_value = "all-authenticated")]
    default_policy: String,
    /// Trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

pub(crate) fn caller_id(from: &str, td: &str) -> anyhow::Result<Option<SpiffeId>> {
    if from == "plaintext" {
        return Ok(None);
    }
    if from.starts_with("spiffe://") {
        return Ok(Some(from.parse()?));
    }
    let (ns, sa) = from
        .split_once('/')
        .context("--from: give a SPIFFE ID, ns/sa, or plaintext")?;
    Ok(Some(SpiffeId::new(td, ns, sa)?))
}

fn inbound_from_manifests(args: &CheckArgs) -> anyhow::Result<InboundPolicy> {
    let namespace = args.to.clone();
    palisade_ca_api::spiffe::validate_namespace(&namespace)
        .context("--to: with --policies give the target's namespace")?;
    let mut labels = BTreeMap::new();
    for pair in args.labels.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--labels: {pair:?} is not k=v"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let policies = palisade::manifests::read_policies(&args.policies)?;
    let default_policy: DefaultPolicy = args
        .default_policy
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--default-policy")?;
    Ok(InboundPolicy {
        trust_domain: args.trust_domain.clone(),
        workload: format!("{namespace}/(labels {})", args.labels),
        namespace: namespace.clone(),
        default_policy,
        policies: policies_selecting(&policies, &namespace, &labels),
    })
}

fn inbound_from_mesh_file(
    args: &CheckArgs,
    path: &std::path::Path,
) -> anyhow::Result<InboundPolicy> {
    let state = palisade_ca::mesh::file::load_mesh_file(path, &args.trust_domain)?;
    let (ns, name) = args
        .to
        .split_once('/')
        .context("--to: give the workload as ns/name")?;
    let w = state
        .workloads()
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
        .with_context(|| format!("no workload {ns}/{name} in {}", path.display()))?;
    Ok(state.inbound_policy(w))
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let inbound = match &args.mesh_file {
        Some(path) => inbound_from_mesh_file(args, path)?,
        None if !args.policies.is_empty() => inbound_from_manifests(args)?,
        None => bail!("give --mesh-file FILE or --policies FILE (MeshPolicy manifests)"),
    };
    let id = caller_id(&args.from, &args.trust_domain)?;
    let caller = id
        .as_ref()
        .map_or(Caller::Unauthenticated, Caller::Authenticated);
    let d = evaluate_inbound(&inbound, args.port, caller);
    let who = id.map_or("a plaintext caller".to_owned(), |i| i.to_string());
    let verdict = match d.result() {
        "allow" => "ALLOW",
        "audit_deny" => "ALLOW (audit: would be denied)",
        _ => "DENY",
    };
    println!("{verdict}: {who} -> {}:{}", inbound.workload, args.port);
    println!("  decided by {} ({})", d.policy, d.reason.as_str());
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
