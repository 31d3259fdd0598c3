//! The report: what happened, from what the proxies logged and counted. Pure: the rows are
//! built from captured events, caller outcomes and `/metrics` text, then laid out as tables.

use std::fmt::Write as _;

use super::capture::PolicyEvent;
use super::traffic::Outcome;

/// One call: who called whom, what the target's proxy decided, and what the caller saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRow {
    pub caller: String,
    pub target: String,
    pub identity: String,
    pub decision: String,
    pub why: String,
}

impl CallRow {
    /// `event` is the decision the target's proxy logged for this call.
    pub fn new(caller: &str, event: &PolicyEvent, outcome: &Outcome) -> CallRow {
        let identity = if event.caller == "unauthenticated" {
            format!("none: plaintext from {}", host(&event.caller_address))
        } else {
            event.caller.clone()
        };
        let saw = match outcome {
            Outcome::Answered { status, .. } => format!("HTTP {status}"),
            Outcome::Closed => "closed".into(),
            Outcome::Failed(_) => "failed".into(),
        };
        CallRow {
            caller: caller.to_owned(),
            target: format!("{} :{}", event.target, event.port),
            identity,
            decision: format!("{} ({saw})", event.result.to_uppercase()),
            why: format!("{}: {}", event.policy, event.reason),
        }
    }
}

/// The calls as a table, one row each.
fn calls_table(calls: &[CallRow]) -> String {
    let rows: Vec<Vec<String>> = calls
        .iter()
        .map(|c| {
            vec![
                format!("{} → {}", c.caller, c.target),
                c.identity.clone(),
                c.decision.clone(),
                c.why.clone(),
            ]
        })
        .collect();
    table(&["call", "identity", "decision", "why"], &rows)
}

fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// One proxy's certificate before and after the rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationRow {
    pub workload: String,
    pub before: String,
    pub after: String,
    /// When the new serial was first seen, in seconds since the demo started.
    pub seen_at: f64,
}

/// The CA's own rotation of its intermediate: fingerprints, and each phase with its duration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaRotation {
    pub before: String,
    pub after: String,
    pub phases: Vec<(String, f64)>,
    pub traffic: Traffic,
}

/// Requests made while the certificates rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    pub requests: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `[workload, address, identity, what runs there]`.
    pub mesh: Vec<[String; 4]>,
    pub calls: Vec<CallRow>,
    /// How the calls to the Service spread over its replicas.
    pub service: Vec<String>,
    /// A line on the policy change, when one was made.
    pub policy_change: Option<String>,
    /// Observe → suggest → audit → enforce, one line each.
    pub least_privilege: Vec<String>,
    /// The calls that showed each of its steps.
    pub least_privilege_calls: Vec<CallRow>,
    pub cert_ttl_seconds: u64,
    pub rotations: Vec<RotationRow>,
    pub traffic: Traffic,
    pub ca_rotation: Option<CaRotation>,
    pub totals: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Mesh (each workload's address stands for its pod IP)")?;
        let mesh: Vec<Vec<String>> = self.mesh.iter().map(|r| r.to_vec()).collect();
        f.write_str(&table(&["workload", "address", "identity", "runs"], &mesh))?;
        writeln!(f)?;
        writeln!(
            f,
            "Calls (decided and logged by the target's proxy; identity = the caller's verified certificate)"
        )?;
        f.write_str(&calls_table(&self.calls))?;
        if let Some(change) = &self.policy_change {
            writeln!(f, "  {change}")?;
        }
        writeln!(f)?;
        if !self.least_privilege.is_empty() {
            writeln!(
                f,
                "Least privilege from observed traffic (`palisade policy suggest`, docs/operations.md)"
            )?;
            for line in &self.least_privilege {
                writeln!(f, "  {line}")?;
            }
            f.write_str(&calls_table(&self.least_privilege_calls))?;
            writeln!(f)?;
        }
        if !self.service.is_empty() {
            writeln!(
                f,
                "Service shop/api (the callers' apps connect to its address; their proxies pick a replica, power of two choices)"
            )?;
            for line in &self.service {
                writeln!(f, "  {line}")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "Rotation (certificates live {}s; each proxy renews at half-life ±10%, with a fresh key)",
            self.cert_ttl_seconds
        )?;
        let rotations: Vec<Vec<String>> = self
            .rotations
            .iter()
            .map(|r| {
                vec![
                    r.workload.clone(),
                    short_serial(&r.before),
                    short_serial(&r.after),
                    format!("{:.1}s", r.seen_at),
                ]
            })
            .collect();
        f.write_str(&table(
            &["proxy", "serial before", "serial after", "renewed at"],
            &rotations,
        ))?;
        writeln!(
            f,
            "  shop/web → Service shop/api meanwhile: {} requests, {} failed",
            self.traffic.requests, self.traffic.failed
        )?;
        if let Some(r) = &self.ca_rotation {
            writeln!(f)?;
            writeln!(
                f,
                "Intermediate rotation (the CA replaces the intermediate that signs; proxies renew early when told)"
            )?;
            let phases: Vec<String> = r
                .phases
                .iter()
                .map(|(p, secs)| format!("{p} {secs:.1}s"))
                .collect();
            writeln!(f, "  phases: {} → idle", phases.join(" → "))?;
            writeln!(
                f,
                "  intermediate {} → {}",
                short_serial(&r.before),
                short_serial(&r.after)
            )?;
            writeln!(
                f,
                "  shop/web → Service shop/api meanwhile: {} requests, {} failed",
                r.traffic.requests, r.traffic.failed
            )?;
        }
        writeln!(f)?;
        writeln!(f, "Totals (from the proxies' and the CA's /metrics)")?;
        for line in &self.totals {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// The first 12 hex digits of a serial: enough to tell certificates apart.
fn short_serial(serial: &str) -> String {
    if serial.len() > 12 {
        format!("{}…", &serial[..12])
    } else {
        serial.to_owned()
    }
}

/// Columns padded to their widest cell, two spaces apart, indented by two.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .chain([headers[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(l, " {cell:<w$} ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// The samples of one metric in Prometheus text: each sample's labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            (metric == name).then(|| (parse_labels(labels), value))
        })
        .collect()
}

fn parse_labels(labels: &str) -> Vec<(String, String)> {
    // Label values here are plain words (no escaped quotes or commas).
    labels
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}

/// The sum of a metric over the samples whose labels include `wanted`.
pub fn total(text: &str, name: &str, wanted: &[(&str, &str)]) -> u64 {
    samples(text, name)
        .iter()
        .filter(|(labels, _)| {
            wanted
                .iter()
                .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

/// `allow 57 (rule_matched 57), deny 2 (no_rule_matched 1, plaintext_not_allowed 1)` from
/// `palisade_policy_decisions_total`.
pub fn decisions_line(metrics: &str) -> String {
    let mut by_result: Vec<(String, u64, Vec<String>)> = Vec::new();
    for (labels, value) in samples(metrics, "palisade_policy_decisions_total") {
        let get = |k: &str| {
            labels
                .iter()
                .find(|(lk, _)| lk == k)
                .map_or(String::new(), |(_, v)| v.clone())
        };
        let (result, reason, n) = (get("result"), get("reason"), value as u64);
        match by_result.iter_mut().find(|(r, _, _)| *r == result) {
            Some((_, sum, reasons)) => {
                *sum += n;
                reasons.push(format!("{reason} {n}"));
            }
            None => by_result.push((result, n, vec![format!("{reason} {n}")])),
        }
    }
    if by_result.is_empty() {
        return "none".into();
    }
    by_result
        .iter()
        .map(|(result, n, reasons)| format!("{result} {n} ({})", reasons.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP palisade_policy_decisions_total Inbound policy decisions.
# TYPE palisade_policy_decisions_total counter
palisade_policy_decisions_total{result=\"allow\",reason=\"rule_matched\"} 57
palisade_policy_decisions_total{result=\"deny\",reason=\"no_rule_matched\"} 1
palisade_policy_decisions_total{result=\"deny\",reason=\"plaintext_not_allowed\"} 1
palisade_certificate_rotations_total 3
";

    fn event(result: &str, caller: &str, reason: &str) -> PolicyEvent {
        PolicyEvent {
            result: result.into(),
            caller: caller.into(),
            caller_address: "127.0.10.9:40312".into(),
            target: "shop/api".into(),
            port: 41234,
            policy: "shop/api-from-web".into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn metrics_are_read_by_name_and_labels() {
        assert_eq!(
            total(
                METRICS,
                "palisade_policy_decisions_total",
                &[("result", "deny")]
            ),
            2
        );
        assert_eq!(total(METRICS, "palisade_policy_decisions_total", &[]), 59);
        assert_eq!(
            total(METRICS, "palisade_certificate_rotations_total", &[]),
            3
        );
        assert_eq!(total(METRICS, "palisade_missing_total", &[]), 0);
        assert_eq!(
            decisions_line(METRICS),
            "allow 57 (rule_matched 57), deny 2 (no_rule_matched 1, plaintext_not_allowed 1)"
        );
        assert_eq!(decisions_line(""), "none");
    }

    #[test]
    fn a_call_row_says_who_what_and_why_from_the_event() {
        let id = "spiffe://cluster.local/ns/shop/sa/intruder";
        let row = CallRow::new(
            "shop/intruder",
            &event("deny", id, "no_rule_matched"),
            &Outcome::Closed,
        );
        assert_eq!(
            row,
            CallRow {
                caller: "shop/intruder".into(),
                target: "shop/api :41234".into(),
                identity: id.into(),
                decision: "DENY (closed)".into(),
                why: "shop/api-from-web: no_rule_matched".into(),
            }
        );
        let plaintext = CallRow::new(
            "outsider",
            &event("deny", "unauthenticated", "plaintext_not_allowed"),
            &Outcome::Closed,
        );
        assert_eq!(plaintext.identity, "none: plaintext from 127.0.10.9");
        let allowed = CallRow::new(
            "shop/web",
            &event(
                "allow",
                "spiffe://cluster.local/ns/shop/sa/web",
                "rule_matched",
            ),
            &Outcome::Answered {
                status: 200,
                body: String::new(),
            },
        );
        assert_eq!(allowed.decision, "ALLOW (HTTP 200)");
    }

    #[test]
    fn tables_align_columns_and_the_report_shows_every_part() {
        let t = table(
            &["a", "bb"],
            &[
                vec!["long cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        assert_eq!(t, "  a          bb\n  long cell  x\n  y          z\n");
        let report = Report {
            mesh: vec![[
                "shop/web".into(),
                "127.0.10.2".into(),
                "spiffe://cluster.local/ns/shop/sa/web".into(),
                "proxy".into(),
            ]],
            calls: vec![CallRow::new(
                "shop/intruder",
                &event(
                    "deny",
                    "spiffe://cluster.local/ns/shop/sa/intruder",
                    "no_rule_matched",
                ),
                &Outcome::Closed,
            )],
            service: vec!["shop/api-1: 12 of 20 calls".into()],
            policy_change: Some("policy changed".into()),
            least_privilege: vec!["suggested: MeshPolicy shop/api-8080-observed".into()],
            least_privilege_calls: vec![CallRow::new(
                "shop/intruder",
                &event(
                    "audit_deny",
                    "spiffe://cluster.local/ns/shop/sa/intruder",
                    "no_rule_matched",
                ),
                &Outcome::Answered {
                    status: 200,
                    body: String::new(),
                },
            )],
            cert_ttl_seconds: 20,
            rotations: vec![RotationRow {
                workload: "shop/web".into(),
                before: "0123456789abcdef0123".into(),
                after: "fedcba9876543210fedc".into(),
                seen_at: 9.5,
            }],
            traffic: Traffic {
                requests: 120,
                failed: 0,
            },
            ca_rotation: Some(CaRotation {
                before: "aaaaaaaaaaaaaaaa".into(),
                after: "bbbbbbbbbbbbbbbb".into(),
                phases: vec![("issuing".into(), 2.25), ("retiring".into(), 0.5)],
                traffic: Traffic {
                    requests: 40,
                    failed: 0,
                },
            }),
            totals: vec!["api proxy decisions: allow 1".into()],
        }
        .to_string();
        for part in [
            "shop/intruder → shop/api :41234",
            "DENY (closed)",
            "shop/api-from-web: no_rule_matched",
            "policy changed",
            "Least privilege from observed traffic",
            "suggested: MeshPolicy shop/api-8080-observed",
            "AUDIT_DENY (HTTP 200)",
            "0123456789ab…",
            "fedcba987654…",
            "9.5s",
            "120 requests, 0 failed",
            "api proxy decisions: allow 1",
            "Service shop/api (",
            "shop/api-1: 12 of 20 calls",
            "phases: issuing 2.2s → retiring 0.5s → idle",
            "intermediate aaaaaaaaaaaa… → bbbbbbbbbbbb…",
            "40 requests, 0 failed",
        ] {
            assert!(report.contains(part), "{part} missing from:\n{report}");
        }
    }
}
