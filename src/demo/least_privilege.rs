//! From no policy to least privilege on the demo's own workloads, the way operations.md tells
//! an operator: observe with the default `all-authenticated`, suggest from what the api's
//! proxies counted, apply the suggestion in `mode: audit`, then `enforce` — and the intruder,
//! let in by hand earlier, is shut out again while shop/web keeps working.

use anyhow::{anyhow, bail};

use super::capture::PolicyEvents;
use super::progress::Progress;
use super::report::CallRow;
use super::traffic::{admin_get, get};
use super::world::{INTRUDER, NAMESPACE, WEB, World};
use super::{Call, until_decided};
use crate::policy_suggest::{Observation, suggest};

/// Calls of shop/web to the Service shop/api while the api's proxies count.
const OBSERVED_CALLS: usize = 10;

/// Returns the report's lines and the calls that showed each step.
pub async fn observe_suggest_enforce(
    world: &World,
    events: &PolicyEvents,
    progress: &Progress,
    api_port: u16,
) -> anyhow::Result<(Vec<String>, Vec<CallRow>)> {
    let mut lines = Vec::new();
    let mut rows = Vec::new();
    let web = |result, reason, policy: &str| Call {
        step: "",
        caller: WEB.name(),
        from: WEB.ip,
        to: world.web.bound.outbound,
        identity: WEB.spiffe_id(),
        result,
        reason,
        policy: policy.to_owned(),
    };
    let intruder = |result, reason, policy: &str| Call {
        step: "",
        caller: INTRUDER.name(),
        from: INTRUDER.ip,
        to: world.intruder.bound.outbound,
        identity: INTRUDER.spiffe_id(),
        result,
        reason,
        policy: policy.to_owned(),
    };

    progress
        .step("least privilege 1/3: observe — the api's policy removed, shop/web's calls counted");
    world.set_policies(&[])?;
    let default = "default:all-authenticated";
    let (row, _) = until_decided(
        events,
        api_port,
        &web("allow", "default_all_authenticated", default),
    )
    .await?;
    rows.push(row);
    let baseline = scrape(world).await?;
    for i in 0..OBSERVED_CALLS {
        let outcome = get(Some(WEB.ip), world.web.bound.outbound, "/orders").await;
        if !outcome.is_ok() {
            bail!("observed call {i} of shop/web to the Service shop/api failed: {outcome}");
        }
    }
    let observations: Vec<Observation> = scrape(world)
        .await?
        .into_iter()
        .zip(baseline)
        .map(|((target, metrics), (_, before))| Observation {
            target,
            metrics,
            baseline: Some(before),
        })
        .collect();
    lines.push(format!(
        "observed: {OBSERVED_CALLS} calls of shop/web to the Service shop/api under the default all-authenticated, counted by api-1's and api-2's proxies (palisade_inbound_connections_total)"
    ));

    progress.step("least privilege 2/3: suggest, and apply the suggestion in audit mode");
    let state = world.ca.ca.publisher.current().state;
    let suggestion = suggest(&state, &observations, "audit")?;
    let [manifest] = suggestion.manifests.as_slice() else {
        bail!(
            "`palisade policy suggest` wrote {} policies from shop/web's calls, not one:\n{}",
            suggestion.manifests.len(),
            suggestion.text
        );
    };
    let expected_rules = serde_json::json!([{"serviceAccounts": [WEB.name()]}]);
    if manifest["spec"]["allow"] != expected_rules
        || manifest["spec"]["ports"] != serde_json::json!([api_port])
    {
        bail!(
            "`palisade policy suggest` should allow exactly shop/web on port {api_port}, but wrote:\n{}",
            suggestion.text
        );
    }
    let name = manifest["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("a suggested policy has no name:\n{}", suggestion.text))?;
    let policy = format!("{NAMESPACE}/{name}");
    lines.push(format!(
        "suggested: MeshPolicy {policy}: allow shop/web on port {api_port}, mode audit (nothing else was seen)"
    ));
    world.set_policies(std::slice::from_ref(manifest))?;
    let (row, took) = until_decided(
        events,
        api_port,
        &intruder("audit_deny", "no_rule_matched", &policy),
    )
    .await?;
    rows.push(row);
    lines.push(format!(
        "audit: applied in {:.1}s; shop/intruder still gets through, logged and counted as audit_deny: the would-deny an operator watches before enforcing",
        took.as_secs_f64()
    ));

    progress.step("least privilege 3/3: enforce the suggested policy");
    let mut enforced = manifest.clone();
    enforced["spec"]["mode"] = "enforce".into();
    world.set_policies(&[enforced])?;
    let (row, took) = until_decided(
        events,
        api_port,
        &intruder("deny", "no_rule_matched", &policy),
    )
    .await?;
    rows.push(row);
    let (row, _) = until_decided(events, api_port, &web("allow", "rule_matched", &policy)).await?;
    rows.push(row);
    lines.push(format!(
        "enforce: applied in {:.1}s; shop/intruder denied, shop/web allowed, by the suggested policy",
        took.as_secs_f64()
    ));
    Ok((lines, rows))
}

/// `(ns/pod, /metrics)` of each api replica's proxy.
async fn scrape(world: &World) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in world.replicas() {
        let text = admin_get(p.bound.admin, "/metrics")
            .await
            .map_err(|e| anyhow!("the /metrics of {}'s proxy: {e}", p.workload.workload()))?;
        out.push((p.workload.workload(), text));
    }
    Ok(out)
}
