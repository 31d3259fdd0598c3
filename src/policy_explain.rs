//! `palisade policy explain`: why a connection is allowed or denied, under a mesh file — the
//! decision, the policy and rule (or the default and where it came from) that decided, the
//! reason code proxies log, and for a denial the smallest change that would admit the caller.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_ca::mesh::{MeshState, Workload};
use palisade_ca_api::SpiffeId;
use palisade_ca_api::contract::DEFAULT_POLICY_ANNOTATION;
use palisade_ca_api::policy::{
    AllowRule, Caller, Decision, InboundPolicy, PolicyMode, Reason, ResolvedPolicy, covers,
    evaluate_inbound, rule_matches,
};

use crate::policy_check::caller_id;
use palisade::cluster::MeshSource;

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    mesh: MeshSource,
    /// The caller: `ns/sa`, a SPIFFE ID, a pod IP (its workload's identity; plaintext when no
    /// meshed workload has it), or `plaintext`.
    #[arg(long, required_unless_present = "event", conflicts_with = "event")]
    from: Option<String>,
    /// The target and port: `ns/pod:PORT`, `IP:PORT` or `[IPv6]:PORT`.
    #[arg(long, required_unless_present = "event", conflicts_with = "event")]
    to: Option<String>,
    /// A denial event as a proxy logged it (one JSON line), instead of --from and --to.
    #[arg(long)]
    event: Option<String>,
}

/// The caller as policy sees it, and how it was found.
struct From {
    id: Option<SpiffeId>,
    note: Option<String>,
}

fn resolve_from(state: &MeshState, from: &str, td: &str) -> anyhow::Result<From> {
    let Ok(ip) = from.parse::<IpAddr>() else {
        return Ok(From {
            id: caller_id(from, td)?,
            note: None,
        });
    };
    Ok(match state.workload_at(ip) {
        Some(w) => From {
            id: state.spiffe_id(w),
            note: Some(format!(
                "{ip} is {}/{}, service account {}",
                w.namespace, w.name, w.service_account
            )),
        },
        None => From {
            id: None,
            note: Some(format!(
                "{ip} is no meshed workload: its connections arrive in plaintext"
            )),
        },
    })
}

fn resolve_to<'a>(state: &'a MeshState, to: &str) -> anyhow::Result<(&'a Workload, u16)> {
    let form = "--to: give ns/pod:PORT, IP:PORT or [IPv6]:PORT";
    if let Ok(addr) = to.parse::<SocketAddr>() {
        let ip = addr.ip();
        if let Some(w) = state.workload_at(ip) {
            return Ok((w, addr.port()));
        }
        if let Some(s) = state.service_at(ip) {
            bail!(
                "{ip} is the address of Service {}/{}: a Service sends each connection to one of its endpoints, whose own policy decides; explain for an endpoint's address",
                s.namespace,
                s.name
            );
        }
        bail!("no meshed workload has {ip}: nothing of Palisade decides on connections to it");
    }
    let (target, port) = to.rsplit_once(':').context(form)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).context(form)?;
    let (ns, name) = target.split_once('/').context(form)?;
    let w = state
        .workloads()
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
        .with_context(|| format!("no workload {ns}/{name} in the mesh file"))?;
    Ok((w, port))
}

fn rule_text(rule: &AllowRule) -> String {
    serde_json::to_string(rule).unwrap_or_else(|_| format!("{rule:?}"))
}

/// The smallest allow rule that admits `caller`, or why none can.
fn smallest_rule(caller: Option<&SpiffeId>, td: &str) -> Result<AllowRule, String> {
    match caller {
        None => Ok(AllowRule::Unauthenticated),
        Some(id) if id.trust_domain() != td => Err(format!(
            "no rule admits {id}: it belongs to trust domain {}, and this mesh is {td}; the caller needs a certificate of {td}",
            id.trust_domain()
        )),
        Some(id) => Ok(AllowRule::ServiceAccounts(vec![
            format!("{}/{}", id.namespace(), id.service_account())
                .parse()
                .map_err(|e: String| e)?,
        ])),
    }
}

fn default_source(state: &MeshState, w: &Workload) -> String {
    if state.namespace_defaults.contains_key(&w.namespace) {
        format!(
            "namespace {}'s annotation {DEFAULT_POLICY_ANNOTATION}",
            w.namespace
        )
    } else {
        "the mesh-wide default: a mesh file's defaultPolicy, or the CA's --default-policy"
            .to_owned()
    }
}

/// What decided, in words, and for a denial what would admit the caller. Pure.
fn explain(
    state: &MeshState,
    w: &Workload,
    inbound: &InboundPolicy,
    port: u16,
    caller: Option<&SpiffeId>,
    d: &Decision,
) -> String {
    let td = inbound.trust_domain.as_str();
    let call = caller.map_or(Caller::Unauthenticated, Caller::Authenticated);
    let covering: Vec<&ResolvedPolicy> = inbound
        .policies
        .iter()
        .filter(|p| covers(p, port))
        .collect();
    let enforcing: Vec<&ResolvedPolicy> = covering
        .iter()
        .copied()
        .filter(|p| p.mode == PolicyMode::Enforce)
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  reason: {} (the reason proxies log)",
        d.reason.as_str()
    );
    if enforcing.is_empty() {
        let _ = writeln!(
            out,
            "  no enforcing MeshPolicy selecting {} covers port {port}: the default decides, {} (from {})",
            inbound.workload,
            inbound.default_policy.as_str(),
            default_source(state, w)
        );
    } else if d.reason == Reason::RuleMatched {
        for p in &enforcing {
            if let Some((i, rule)) = p
                .allow
                .iter()
                .enumerate()
                .find(|(_, r)| rule_matches(r, call, td))
            {
                let _ = writeln!(
                    out,
                    "  decided by {} (enforce), allow rule #{}: {}",
                    p.name,
                    i + 1,
                    rule_text(rule)
                );
                break;
            }
        }
    } else {
        let _ = writeln!(
            out,
            "  enforcing MeshPolicies covering port {port}, none of whose rules admits the caller:"
        );
        for p in &enforcing {
            let rules: Vec<String> = p.allow.iter().map(rule_text).collect();
            let _ = writeln!(out, "    {}: allow [{}]", p.name, rules.join(", "));
        }
    }
    if d.audit_would_deny {
        let _ = writeln!(
            out,
            "  audit: {} would refuse this connection once enforced",
            d.policy
        );
    }
    if !d.allowed {
        out.push_str(&admit(w, inbound, port, caller, &enforcing));
    }
    out
}

/// The smallest change that admits the caller: one rule in the first enforcing policy, or, when
/// the default decided, a MeshPolicy for the workload and port (which then also refuses every
/// caller it does not list on that port).
fn admit(
    w: &Workload,
    inbound: &InboundPolicy,
    port: u16,
    caller: Option<&SpiffeId>,
    enforcing: &[&ResolvedPolicy],
) -> String {
    let rule = match smallest_rule(caller, &inbound.trust_domain) {
        Ok(rule) => rule,
        Err(why) => return format!("  to admit it: {why}\n"),
    };
    let mut out = String::new();
    if caller.is_none() {
        out.push_str(
            "  note: a plaintext caller can be admitted only by unauthenticated: true, which admits every caller; mesh the caller instead\n",
        );
    }
    match enforcing.first() {
        Some(p) => {
            let _ = writeln!(
                out,
                "  to admit it, add to {}'s allow: {}",
                p.name,
                rule_text(&rule)
            );
        }
        None => {
            let labels: BTreeMap<&String, &String> = match w.labels.get_key_value("app") {
                Some((k, v)) => BTreeMap::from([(k, v)]),
                None => w.labels.iter().collect(),
            };
            let selector = serde_json::to_string(&labels).unwrap_or_default();
            let _ = writeln!(
                out,
                "  to admit it, a MeshPolicy for {} on port {port} (it also refuses, on that port, every caller it does not allow: list them all):",
                inbound.workload
            );
            let _ = writeln!(
                out,
                "    apiVersion: palisade.dev/v1alpha1\n    kind: MeshPolicy\n    metadata: {{name: {}-{port}, namespace: {}}}\n    spec: {{targetSelector: {{matchLabels: {selector}}}, ports: [{port}], allow: [{}]}}",
                w.name,
                w.namespace,
                rule_text(&rule)
            );
        }
    }
    out
}

/// `--from`, `--to` and the reason logged, from a proxy's denial event.
fn from_event(line: &str) -> anyhow::Result<(String, String, String)> {
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .context("--event: not JSON; paste one line of the proxy's JSON log")?;
    let fields = v.get("fields").unwrap_or(&v);
    let text = |key: &str| {
        fields[key].as_str().map(str::to_owned).with_context(|| {
            format!("--event: no {key:?}; paste a policy event (message \"connection denied\")")
        })
    };
    let caller = text("caller")?;
    let from = if caller == "unauthenticated" {
        "plaintext".to_owned()
    } else {
        caller
    };
    let port = fields["port"].as_u64().context("--event: no \"port\"")?;
    let to = format!("{}:{port}", text("target_workload")?);
    Ok((from, to, text("reason")?))
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let (from_arg, to_arg, logged) = match &args.event {
        Some(line) => {
            let (from, to, reason) = from_event(line)?;
            (from, to, Some(reason))
        }
        None => (
            args.from.clone().unwrap_or_default(),
            args.to.clone().unwrap_or_default(),
            None,
        ),
    };
    let state = if args.mesh.is_manifests() {
        if from_arg.parse::<IpAddr>().is_ok() {
            bail!(
                "--from: with --policies give the caller as ns/sa, a SPIFFE ID or plaintext: manifests know no pod addresses"
            );
        }
        let (ns, name) = to_arg
            .rsplit_once(':')
            .and_then(|(target, _)| target.split_once('/'))
            .context("--to: with --policies give the target as ns/pod:PORT, with its --labels")?;
        args.mesh.load_with_target(ns, name)?
    } else {
        args.mesh.load()?
    };
    let from = resolve_from(&state, &from_arg, &state.trust_domain)?;
    let (w, port) = resolve_to(&state, &to_arg)?;
    let inbound = state.inbound_policy(w);
    let caller = from
        .id
        .as_ref()
        .map_or(Caller::Unauthenticated, Caller::Authenticated);
    let d = evaluate_inbound(&inbound, port, caller);
    let who = from
        .id
        .as_ref()
        .map_or("a plaintext caller".to_owned(), ToString::to_string);
    let verdict = match d.result() {
        "allow" => "ALLOW",
        "audit_deny" => "ALLOW (audit: would be denied)",
        _ => "DENY",
    };
    println!("{verdict}: {who} -> {}:{port}", inbound.workload);
    if let Some(note) = &from.note {
        println!("  caller: {note}");
    }
    if let Some(logged) = logged.filter(|r| r != d.reason.as_str()) {
        println!(
            "  the proxy logged reason {logged}; under this mesh file it is {}: the policy changed since, or the file is not what the cluster runs",
            d.reason.as_str()
        );
    }
    print!(
        "{}",
        explain(&state, w, &inbound, port, from.id.as_ref(), &d)
    );
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
