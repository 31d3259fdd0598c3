//! `palisade policy suggest`: MeshPolicy manifests that allow exactly the (caller identity →
//! workload, port) edges the proxies saw, from their `palisade_inbound_connections_total`. One
//! policy per workload (by its labels) and port, `mode: audit` unless asked otherwise, so the
//! way from observing to least privilege is: apply, watch the would-deny count stay at zero,
//! switch to `enforce`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use palisade_ca::mesh::MeshState;
use palisade_ca_api::SpiffeId;

use palisade::cluster::MeshSource;

const SERIES: &str = "palisade_inbound_connections_total";

#[derive(clap::Args)]
pub struct SuggestArgs {
    /// The workloads and their labels.
    #[command(flatten)]
    mesh: MeshSource,
    /// `ns/pod=FILE`: the `/metrics` text of that pod's proxy; repeatable (every replica of a
    /// workload adds what it saw). Without it, --kube asks every meshed proxy itself.
    #[arg(long = "metrics", required_unless_present = "kube")]
    metrics: Vec<String>,
    /// With --kube and no --metrics: ask only the proxies of this namespace.
    #[arg(long, requires = "kube", conflicts_with = "metrics")]
    namespace: Option<String>,
    /// The mode of the suggested policies: `audit` (the first step) or `enforce`.
    #[arg(long, default_value = "audit", value_parser = ["audit", "enforce"])]
    mode: String,
}

/// One series of the metric: who called which port, what was decided, how often.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    client: String,
    port: String,
    decision: String,
    count: u64,
}

/// The label values of `name{k="v",…} N` lines (Prometheus text: `\"`, `\\`, `\n` escaped).
fn edges(text: &str) -> Vec<Edge> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(SERIES)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let count = value.trim().parse::<f64>().ok()? as u64;
            let labels = parse_labels(labels)?;
            Some(Edge {
                client: labels.get("client_id")?.clone(),
                port: labels.get("port")?.clone(),
                decision: labels.get("decision")?.clone(),
                count,
            })
        })
        .collect()
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return Some(labels);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// What was seen for one workload (its namespace and labels).
#[derive(Default)]
struct Seen {
    /// Workload names with these labels that reported.
    pods: BTreeSet<String>,
    /// Per port: the callers seen admitted (`ns/sa`, or None for plaintext).
    allowed: BTreeMap<u16, BTreeSet<Option<String>>>,
    /// Per port: the callers seen denied (the metric's `client_id`).
    denied: BTreeMap<u16, BTreeSet<String>>,
    notes: BTreeSet<String>,
}

fn caller(client: &str, td: &str) -> Result<Option<String>, String> {
    if client == "unauthenticated" {
        return Ok(None);
    }
    let id: SpiffeId = client
        .parse()
        .map_err(|e| format!("{client} is not a SPIFFE ID ({e})"))?;
    if id.trust_domain() != td {
        return Err(format!(
            "{client} belongs to trust domain {}: no policy of {td} can name it",
            id.trust_domain()
        ));
    }
    Ok(Some(format!("{}/{}", id.namespace(), id.service_account())))
}

type Groups = BTreeMap<(String, BTreeMap<String, String>), Seen>;

/// What one proxy counted: `ns/pod` of its workload and its `/metrics` text, and optionally an
/// earlier `/metrics` text of the same proxy, so that only what happened since is suggested from.
pub struct Observation {
    pub target: String,
    pub metrics: String,
    pub baseline: Option<String>,
}

/// What `suggest` wrote: the manifests with their comments, and the manifests alone.
pub struct Suggestion {
    pub text: String,
    pub manifests: Vec<serde_json::Value>,
}

/// The manifests that allow exactly what `observations` saw. Pure.
pub fn suggest(
    state: &MeshState,
    observations: &[Observation],
    mode: &str,
) -> anyhow::Result<Suggestion> {
    let seen = observe(state, observations)?;
    Ok(render(state, &seen, mode))
}

/// `after`'s counts less `before`'s, series by series (a counter reset keeps `after`'s).
fn since(after: Vec<Edge>, before: &[Edge]) -> Vec<Edge> {
    after
        .into_iter()
        .map(|mut e| {
            let earlier = before
                .iter()
                .find(|b| b.client == e.client && b.port == e.port && b.decision == e.decision)
                .map_or(0, |b| b.count);
            if earlier <= e.count {
                e.count -= earlier;
            }
            e
        })
        .collect()
}

fn observe(state: &MeshState, observations: &[Observation]) -> anyhow::Result<Groups> {
    let mut seen = Groups::new();
    for o in observations {
        let target = &o.target;
        let (ns, name) = target
            .split_once('/')
            .with_context(|| format!("{target:?}: the target is ns/pod"))?;
        let w = state
            .workloads()
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
            .with_context(|| format!("{target:?}: no workload {ns}/{name} in the mesh file"))?;
        let mut found = edges(&o.metrics);
        if found.is_empty() && !o.metrics.contains(SERIES) {
            bail!(
                "the metrics of {target} have no {SERIES}: are they a Palisade proxy's /metrics (of this version)?"
            );
        }
        if let Some(baseline) = &o.baseline {
            found = since(found, &edges(baseline));
        }
        let entry = seen
            .entry((w.namespace.clone(), w.labels.clone()))
            .or_default();
        entry.pods.insert(w.name.clone());
        for e in found.into_iter().filter(|e| e.count > 0) {
            if e.client == "other" || e.port == "other" {
                entry.notes.insert(format!(
                    "{target}'s proxy counted {} connections past its label bounds (client {}, port {}): collect again later, or review these by hand",
                    e.count, e.client, e.port
                ));
                continue;
            }
            let Ok(port) = e.port.parse::<u16>() else {
                continue;
            };
            if e.decision == "deny" {
                entry.denied.entry(port).or_default().insert(e.client);
                continue;
            }
            match caller(&e.client, &state.trust_domain) {
                Ok(c) => {
                    entry.allowed.entry(port).or_default().insert(c);
                }
                Err(why) => {
                    entry.notes.insert(why);
                }
            }
        }
    }
    Ok(seen)
}

/// One line of a comment: whatever a label or identity holds, it cannot start a YAML line.
fn comment(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("# {clean}\n")
}

/// A DNS-1123 name from `base`: lowercase letters, digits and `-`, at most 40 characters.
fn dns_name(base: &str) -> String {
    let name: String = base
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "workload".into()
    } else {
        name.into()
    }
}

/// The workloads of `ns` outside the group that `labels` also selects.
fn also_selected(
    state: &MeshState,
    ns: &str,
    labels: &BTreeMap<String, String>,
    pods: &BTreeSet<String>,
) -> Vec<String> {
    state
        .workloads()
        .iter()
        .filter(|w| w.namespace == ns && !pods.contains(&w.name))
        .filter(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

/// The manifests, as one YAML stream with comments (each manifest written as JSON, which YAML
/// reads as it is: every value quoted, whatever the labels hold).
fn render(state: &MeshState, seen: &Groups, mode: &str) -> Suggestion {
    let mut out = String::from(
        "# Suggested by `palisade policy suggest` from what the proxies saw. Apply with\n# mode: audit, watch palisade_policy_decisions_total{result=\"audit_deny\"} stay at 0, then\n# set mode: enforce. A MeshPolicy on a port refuses every caller it does not list there.\n",
    );
    let mut names = BTreeSet::new();
    let mut manifests = Vec::new();
    for ((ns, labels), s) in seen {
        let pods = s.pods.iter().cloned().collect::<Vec<_>>().join(", ");
        let others = also_selected(state, ns, labels, &s.pods);
        if labels.is_empty() || !others.is_empty() {
            out.push_str(&comment(&format!(
                "{ns}: {pods}: no policy suggested: its labels {labels:?} also select {}; give it a label of its own and run suggest again",
                if others.is_empty() { "every workload of the namespace".to_owned() } else { others.join(", ") }
            )));
            continue;
        }
        let default = state
            .namespace_defaults
            .get(ns)
            .copied()
            .unwrap_or(state.default_policy);
        let base = dns_name(
            labels
                .get("app")
                .unwrap_or(&s.pods.iter().next().cloned().unwrap_or_default()),
        );
        for (port, callers) in &s.allowed {
            let denied = s.denied.get(port).cloned().unwrap_or_default();
            let mut rules = Vec::new();
            let mut warnings = Vec::new();
            let denied_accounts: BTreeSet<String> = denied
                .iter()
                .filter_map(|d| caller(d, &state.trust_domain).ok().flatten())
                .collect();
            let mut accounts = Vec::new();
            for sa in callers.iter().flatten() {
                if denied_accounts.contains(sa) {
                    warnings.push(format!("{sa} was both admitted and denied on port {port} (did the policy change while counting?): not allowed here, review it"));
                } else {
                    accounts.push(sa);
                }
            }
            if !accounts.is_empty() {
                rules.push(serde_json::json!({"serviceAccounts": accounts}));
            }
            if callers.contains(&None) {
                if denied.is_empty() {
                    warnings.push("plaintext callers were seen; `unauthenticated: true` admits anyone who can reach the port".into());
                    rules.push(serde_json::json!({"unauthenticated": true}));
                } else {
                    warnings.push(format!("plaintext callers were seen, but `unauthenticated: true` would also admit the identities denied on port {port}: not allowed here, review it"));
                }
            }
            if rules.is_empty() {
                continue;
            }
            let mut name = format!("{base}-{port}-observed");
            if !names.insert(name.clone()) {
                let tag = &palisade_ca_api::cert::sha256_fingerprint(
                    format!("{ns}{labels:?}").as_bytes(),
                )[..8];
                name = format!("{base}-{tag}-{port}-observed");
                names.insert(name.clone());
            }
            out.push_str("---\n");
            out.push_str(&comment(&format!(
                "{ns}: {pods} (default policy of the namespace: {}); port {port}",
                default.as_str()
            )));
            for w in &warnings {
                out.push_str(&comment(&format!("WARNING: {w}")));
            }
            let manifest = serde_json::json!({
                "apiVersion": "palisade.dev/v1alpha1",
                "kind": "MeshPolicy",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "targetSelector": {"matchLabels": labels},
                    "ports": [port],
                    "mode": mode,
                    "allow": rules,
                },
            });
            out.push_str(&serde_json::to_string_pretty(&manifest).expect("manifests serialize"));
            out.push('\n');
            manifests.push(manifest);
        }
        for (port, clients) in &s.denied {
            for c in clients {
                out.push_str(&comment(&format!(
                    "{ns}/{base}: seen and denied, not allowed here: {c} → port {port}"
                )));
            }
        }
        for n in &s.notes {
            out.push_str(&comment(&format!("note: {n}")));
        }
    }
    Suggestion {
        text: out,
        manifests,
    }
}

pub fn run(args: &SuggestArgs) -> anyhow::Result<()> {
    let state = args.mesh.load()?;
    let mut observations = Vec::new();
    if args.metrics.is_empty() {
        let found = args.mesh.proxy_metrics(args.namespace.as_deref())?;
        for line in &found.missing {
            eprintln!("palisade: not counted: {line}");
        }
        if found.answered.is_empty() {
            bail!(
                "no proxy answered ({} not counted, listed above): nothing to suggest from",
                found.missing.len()
            );
        }
        observations.extend(
            found
                .answered
                .into_iter()
                .map(|(target, metrics)| Observation {
                    target,
                    metrics,
                    baseline: None,
                }),
        );
    }
    for given in &args.metrics {
        let (target, file) = given
            .split_once('=')
            .with_context(|| format!("--metrics {given:?}: give ns/pod=FILE"))?;
        let metrics = std::fs::read_to_string(file)
            .with_context(|| format!("--metrics {given:?}: cannot read {file}"))?;
        observations.push(Observation {
            target: target.to_owned(),
            metrics,
            baseline: None,
        });
    }
    let suggestion = suggest(&state, &observations, &args.mode)
        .context("--metrics: cannot suggest from what was given")?;
    print!("{}", suggestion.text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_read_with_escaped_labels_and_others_ignored() {
        let text = "# HELP x\npalisade_inbound_connections_total{client_id=\"spiffe://td/ns/a/sa/b\",port=\"8080\",decision=\"allow\"} 3\npalisade_inbound_connections_total{client_id=\"we\\\"ird\",port=\"1\",decision=\"deny\"} 1\npalisade_policy_decisions_total{result=\"allow\"} 3\n";
        let found = edges(text);
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0],
            Edge {
                client: "spiffe://td/ns/a/sa/b".into(),
                port: "8080".into(),
                decision: "allow".into(),
                count: 3
            }
        );
        assert_eq!(found[1].client, "we\"ird");
    }

    #[test]
    fn a_baseline_leaves_only_what_was_counted_since() {
        let series = |client: &str, decision: &str, count: u64| Edge {
            client: client.into(),
            port: "8080".into(),
            decision: decision.into(),
            count,
        };
        let before = [series("a", "allow", 5), series("b", "deny", 2)];
        let after = vec![
            series("a", "allow", 8),
            series("b", "deny", 2),
            series("c", "allow", 1),
            // Counted fewer than before: the proxy restarted, so all of it is new.
            series("b", "allow", 0),
        ];
        let mut reset = before.to_vec();
        reset.push(series("b", "allow", 4));
        assert_eq!(
            since(after, &reset),
            vec![
                series("a", "allow", 3),
                series("b", "deny", 0),
                series("c", "allow", 1),
                series("b", "allow", 0),
            ]
        );
        assert_eq!(
            since(vec![series("a", "allow", 2)], &before),
            vec![series("a", "allow", 2)]
        );
    }
}
