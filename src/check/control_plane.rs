//! The control plane: CA pods ready, the CA's admin API answering, the root and intermediate
//! far enough from expiry, how long the mesh would last without the CA, and proxies that lag a
//! root rotation.
//!
//! The CA's admin port answers `GET /rotation` and `GET /metrics` to any caller (only `POST`
//! is loopback-only), so both are read through the API server's pod proxy. `/rotation` is the
//! source; the metrics stand in for it when it does not answer.

use kube::ResourceExt as _;
use palisade_ca::rotation::{LaggingProxy, RotationStatus};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::CheckResult;
use super::fetch::CA_POD_LABEL;
use super::snapshot::{CaAdmin, ClusterSnapshot, date, pod_problem, pod_ready};

/// Red when the root or the intermediate expires within this and no rotation runs.
pub const CA_EXPIRY_WARNING_DAYS: i64 = 30;
const DAY: i64 = 86_400;

pub fn check(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let mut out = ca_pods(s);
    let Some(admin) = &s.ca_admin else {
        out.push(CheckResult::fail(
            "ca-api",
            "no ready CA pod to ask for its rotation status and metrics",
            "make a CA pod ready first (see ca-pods above)",
        ));
        return out;
    };
    let (api, view) = read_admin(admin, &s.namespace, s.now);
    out.extend(api);
    let Some(view) = view else { return out };
    let pod = admin.pod.rsplit('/').next().unwrap_or_default();
    out.push(expiry(
        "ca-root-expiry",
        "root",
        view.root_expiry,
        s,
        &view,
        pod,
    ));
    out.push(expiry(
        "ca-intermediate-expiry",
        "intermediate",
        view.intermediate_expiry,
        s,
        &view,
        pod,
    ));
    out.push(mesh_expiry(&view, s.now));
    out.extend(lagging(&view));
    out
}

fn ca_pods(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let ns = &s.namespace;
    let pods: Vec<_> = s
        .pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| p.labels().get(CA_POD_LABEL.0).map(String::as_str) == Some(CA_POD_LABEL.1))
        .collect();
    if pods.is_empty() {
        return vec![CheckResult::fail(
            "ca-pods",
            format!(
                "no CA pod in namespace {ns} (label {}={})",
                CA_POD_LABEL.0, CA_POD_LABEL.1
            ),
            format!(
                "install the chart into {ns} (`helm upgrade --install palisade charts/palisade -n {ns}`), or pass --namespace where Palisade runs; `kubectl -n {ns} get deployment palisade-ca` shows why it has no pods"
            ),
        )];
    }
    let mut out = Vec::new();
    let mut ready = Vec::new();
    for pod in pods {
        let name = pod.name_any();
        if pod_ready(pod) {
            ready.push(name);
        } else {
            out.push(CheckResult::fail(
                "ca-pods",
                format!("CA pod {ns}/{name} is not ready: {}", pod_problem(pod)),
                format!("kubectl -n {ns} describe pod {name}; kubectl -n {ns} logs {name}"),
            ));
        }
    }
    if !ready.is_empty() {
        out.insert(
            0,
            CheckResult::pass(
                "ca-pods",
                format!(
                    "{} CA pod(s) ready in {ns}: {}",
                    ready.len(),
                    ready.join(", ")
                ),
            ),
        );
    }
    out
}

/// What the CA says about itself, from `/rotation` or else `/metrics`.
#[derive(Debug, Clone, PartialEq)]
struct CaView {
    phase: String,
    root_expiry: i64,
    intermediate_expiry: i64,
    mesh_expiry: Option<i64>,
    /// The lagging proxies by name (from `/rotation`), or only their number (from metrics).
    lagging: Result<Vec<LaggingProxy>, u64>,
    /// Unknown from metrics alone.
    rotatable: Option<bool>,
    automatic: Option<bool>,
    /// Whether the CA holds its root's key (false: an operator's root kept offline).
    root_key_held: Option<bool>,
    ca_pod: String,
}

fn read_admin(admin: &CaAdmin, ns: &str, now: i64) -> (Vec<CheckResult>, Option<CaView>) {
    let pod = &admin.pod;
    let name = pod.rsplit('/').next().unwrap_or_default();
    let logs = format!(
        "kubectl -n {ns} logs {name}; the admin port is {} (`--admin-listen`)",
        palisade_ca_api::contract::CONTROL_PLANE_ADMIN_PORT
    );
    let mut out = Vec::new();
    let status = admin
        .rotation
        .as_ref()
        .map_err(String::clone)
        .and_then(|text| {
            let status: RotationStatus = serde_json::from_str(text).map_err(|e| {
                format!("GET /rotation answered something that is not a rotation status: {e}")
            })?;
            view_of_status(&status, pod)
        });
    let metrics = admin
        .metrics
        .as_ref()
        .map_err(String::clone)
        .and_then(|text| view_of_metrics(text, pod, now));
    for (what, result) in [("/rotation", &status), ("/metrics", &metrics)] {
        if let Err(e) = result {
            let mut fix = format!("{logs}; GET {what} must answer (docs/rotation.md)");
            if e.contains("HTTP 503") || e.contains("no answer within") {
                fix.push_str(&format!(
                    "\na timeout or 503 through the pod proxy is often NetworkPolicy palisade-ca, which admits port {} only from the monitoring namespace: allow the API server's address there too (docs/operations.md, `palisade check`)",
                    palisade_ca_api::contract::CONTROL_PLANE_ADMIN_PORT
                ));
            }
            out.push(CheckResult::fail(
                "ca-api",
                format!("CA pod {pod}: {e}"),
                fix,
            ));
        }
    }
    if out.is_empty() {
        out.push(CheckResult::pass(
            "ca-api",
            format!("CA pod {pod} answers GET /rotation and GET /metrics"),
        ));
    }
    (out, status.or(metrics).ok())
}

fn unix_of(text: &str, field: &str) -> Result<i64, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|e| format!("GET /rotation: {field} {text:?} is not an RFC 3339 time: {e}"))
}

fn view_of_status(status: &RotationStatus, pod: &str) -> Result<CaView, String> {
    Ok(CaView {
        phase: status.phase.clone(),
        root_expiry: unix_of(&status.root_expires_at, "root_expires_at")?,
        intermediate_expiry: unix_of(&status.intermediate_expires_at, "intermediate_expires_at")?,
        mesh_expiry: status
            .mesh_expires_at
            .as_deref()
            .map(|t| unix_of(t, "mesh_expires_at"))
            .transpose()?,
        lagging: Ok(status.proxies.lagging.clone()),
        rotatable: Some(status.rotatable),
        automatic: Some(status.automatic),
        root_key_held: Some(status.root_key_held),
        ca_pod: pod.to_owned(),
    })
}

/// The value of the series `name` (with `label`, when given) in Prometheus text.
fn sample(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let series = match label {
        Some((k, v)) => format!("{name}{{{k}=\"{v}\"}}"),
        None => name.to_owned(),
    };
    text.lines().find_map(|line| {
        let value = line.strip_prefix(&series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

const PHASES: [&str; 4] = ["idle", "trusting", "issuing", "retiring"];

fn view_of_metrics(text: &str, pod: &str, now: i64) -> Result<CaView, String> {
    let need = |name: &str| {
        sample(text, name, None).map(|v| v as i64).ok_or_else(|| {
            format!("GET /metrics has no {name}: is this a Palisade CA of this version?")
        })
    };
    let phase = PHASES
        .iter()
        .find(|p| sample(text, "palisade_ca_rotation_phase", Some(("phase", p))) == Some(1.0))
        .ok_or("GET /metrics has no palisade_ca_rotation_phase at 1")?;
    Ok(CaView {
        phase: (*phase).to_owned(),
        root_expiry: need("palisade_ca_root_expiry_timestamp_seconds")?,
        intermediate_expiry: need("palisade_ca_intermediate_expiry_timestamp_seconds")?,
        mesh_expiry: sample(text, "palisade_mesh_expiry_seconds", None).map(|s| now + s as i64),
        lagging: Err(need("palisade_ca_rotation_proxies_lagging")?.max(0) as u64),
        rotatable: None,
        automatic: None,
        root_key_held: None,
        ca_pod: pod.to_owned(),
    })
}

fn expiry(
    check: &'static str,
    what: &str,
    expires: i64,
    s: &ClusterSnapshot,
    view: &CaView,
    pod: &str,
) -> CheckResult {
    let ns = &s.namespace;
    let left = expires - s.now;
    let when = date(expires);
    // Only the operator can sign under a root whose key the CA does not hold.
    let offline = format!(
        "have your offline root (or a new one) sign an intermediate, copy it with its key and the root into the CA's pod, then: kubectl -n {ns} exec {pod} -- palisade-ca rotate intermediate --from-cert F --from-key F --chain F (docs/rotation.md, \"An intermediate from an offline root\")"
    );
    if left <= 0 {
        let fix = if view.root_key_held == Some(false) && what == "intermediate" {
            offline.clone()
        } else if what == "root" {
            "follow docs/rotation.md, \"Emergency: the root has already expired\" (`palisade-ca rotate root --emergency`)".to_owned()
        } else {
            format!("kubectl -n {ns} exec {pod} -- palisade-ca rotate intermediate")
        };
        return CheckResult::fail(check, format!("the {what} expired at {when}"), fix);
    }
    let days = left / DAY;
    if left >= CA_EXPIRY_WARNING_DAYS * DAY {
        return CheckResult::pass(
            check,
            format!("the {what} expires at {when} (in {days} days)"),
        );
    }
    if view.phase != "idle" {
        return CheckResult::pass(
            check,
            format!(
                "the {what} expires at {when} (in {days} days); a rotation is in progress (phase {})",
                view.phase
            ),
        );
    }
    let message = format!(
        "the {what} expires at {when} (in {days} days, under {CA_EXPIRY_WARNING_DAYS}) and no rotation is running"
    );
    let fix = if view.root_key_held == Some(false) && view.rotatable == Some(true) {
        offline
    } else if view.rotatable == Some(false) {
        format!(
            "this CA cannot rotate its keys itself (an operator's root or intermediate given by flag): replace the {what} by hand, with --extra-trust-roots during the overlap (docs/rotation.md, \"What does not rotate itself yet\")"
        )
    } else {
        let mut fix = format!(
            "kubectl -n {ns} exec {pod} -- palisade-ca rotate {what}\nthen follow it: kubectl -n {ns} exec {pod} -- palisade-ca rotate status --wait 1h"
        );
        if what == "intermediate" && view.automatic == Some(true) {
            fix.push_str("\nthe CA rotates the intermediate itself at half its life and has not: read its log for why");
        }
        fix
    };
    CheckResult::fail(check, message, fix)
}

fn mesh_expiry(view: &CaView, now: i64) -> CheckResult {
    match view.mesh_expiry {
        None => CheckResult::pass(
            "mesh-expiry",
            "no proxy has reported a current certificate to the CA yet",
        ),
        Some(at) if at <= now => CheckResult::fail(
            "mesh-expiry",
            format!("a proxy's certificate expired at {}", date(at)),
            "see the proxy lines below; a proxy renews at half its certificate's life, so one that could not reach the CA: `kubectl logs POD -c palisade-proxy`",
        ),
        Some(at) => CheckResult::pass(
            "mesh-expiry",
            format!(
                "if the CA stayed down from now, the mesh would keep working for {} minutes (until {})",
                (at - now) / 60,
                date(at)
            ),
        ),
    }
}

fn lagging(view: &CaView) -> Vec<CheckResult> {
    let check = "proxy-trust-bundle";
    let ca = &view.ca_pod;
    match &view.lagging {
        Ok(list) if list.is_empty() => vec![CheckResult::pass(
            check,
            "every proxy trusts every root of the CA's bundle",
        )],
        Err(0) => vec![CheckResult::pass(
            check,
            "every proxy trusts every root of the CA's bundle (from the CA's metrics)",
        )],
        Err(n) => vec![CheckResult::fail(
            check,
            format!("{n} proxies do not trust every root of the CA's bundle (palisade_ca_rotation_proxies_lagging)"),
            format!("name them: kubectl exec {ca} -- palisade-ca rotate status (the pod is namespace/name)"),
        )],
        Ok(list) => list
            .iter()
            .map(|p| {
                let (message, fix) = match p.pod.as_deref().and_then(|p| p.split_once('/')) {
                    Some((ns, name)) => (
                        format!("proxy of {ns}/{name} ({}) does not trust every root of the CA's bundle", p.spiffe_id),
                        format!("kubectl -n {ns} logs {name} -c palisade-proxy; it reads the bundle from its mesh watch and its anchors ConfigMap: if it stays behind, restart it: kubectl -n {ns} delete pod {name}"),
                    ),
                    None => (
                        format!("a proxy of {} does not trust every root of the CA's bundle", p.spiffe_id),
                        "find the pod by that identity and read its proxy's log (`kubectl logs POD -c palisade-proxy`)".to_owned(),
                    ),
                };
                CheckResult::fail(check, message, fix)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::check::test_support::{NOW, app_pod, empty};

    fn at(unix: i64) -> String {
        date(unix)
    }

    fn ca_pod() -> k8s_openapi::api::core::v1::Pod {
        let mut pod = app_pod("palisade-system", "palisade-ca", false);
        pod.metadata.labels = Some([(CA_POD_LABEL.0.to_owned(), CA_POD_LABEL.1.to_owned())].into());
        pod
    }

    fn rotation(phase: &str, root_days: i64, intermediate_days: i64) -> serde_json::Value {
        json!({"phase": phase, "trusted_roots": ["aa"], "issuing_root": "aa", "issuing_intermediate": "bb",
            "proxies": {"total": 2, "confirmed": 2, "lagging": []}, "leaves_on_previous_root": 0,
            "started_at": null, "deadline": null,
            "root_expires_at": at(NOW + root_days * DAY), "intermediate_expires_at": at(NOW + intermediate_days * DAY),
            "mesh_expires_at": at(NOW + 1800), "rotatable": true, "automatic": true})
    }

    fn with_admin(
        rotation: Result<serde_json::Value, String>,
        metrics: Result<String, String>,
    ) -> ClusterSnapshot {
        let mut s = empty();
        s.pods.push(ca_pod());
        s.ca_admin = Some(CaAdmin {
            pod: "palisade-system/palisade-ca-5c7d8f9b6-qw4rt".into(),
            rotation: rotation.map(|v| v.to_string()),
            metrics,
        });
        s
    }

    fn metrics(phase: &str, root: i64, lagging: u64) -> String {
        let mut text = format!(
            "# TYPE palisade_ca_root_expiry_timestamp_seconds gauge\npalisade_ca_root_expiry_timestamp_seconds {root}\npalisade_ca_intermediate_expiry_timestamp_seconds {}\npalisade_ca_rotation_proxies_lagging {lagging}\npalisade_mesh_expiry_seconds 1800\n",
            NOW + 200 * DAY
        );
        for p in PHASES {
            text.push_str(&format!(
                "palisade_ca_rotation_phase{{phase=\"{p}\"}} {}\n",
                (p == phase) as u8
            ));
        }
        text
    }

    fn by_check<'a>(results: &'a [CheckResult], check: &str) -> &'a CheckResult {
        results
            .iter()
            .find(|r| r.check == check)
            .unwrap_or_else(|| panic!("no {check} in {results:#?}"))
    }

    #[test]
    fn a_healthy_control_plane_is_all_green() {
        let results = check(&with_admin(
            Ok(rotation("idle", 3000, 300)),
            Ok(metrics("idle", NOW + 3000 * DAY, 0)),
        ));
        assert!(results.iter().all(|r| r.ok), "{results:#?}");
        let checks: Vec<&str> = results.iter().map(|r| r.check).collect();
        assert_eq!(
            checks,
            [
                "ca-pods",
                "ca-api",
                "ca-root-expiry",
                "ca-intermediate-expiry",
                "mesh-expiry",
                "proxy-trust-bundle"
            ]
        );
        assert_eq!(
            by_check(&results, "mesh-expiry")
                .message
                .split(" minutes")
                .next()
                .unwrap(),
            "if the CA stayed down from now, the mesh would keep working for 30"
        );
    }

    #[test]
    fn a_root_near_expiry_is_red_unless_a_rotation_runs() {
        let results = check(&with_admin(
            Ok(rotation("idle", 20, 300)),
            Ok(metrics("idle", NOW + 20 * DAY, 0)),
        ));
        let root = by_check(&results, "ca-root-expiry");
        assert!(!root.ok);
        assert!(
            root.message
                .contains("(in 20 days, under 30) and no rotation is running"),
            "{root:?}"
        );
        assert!(root.fix.as_deref().unwrap().starts_with(
            "kubectl -n palisade-system exec palisade-ca-5c7d8f9b6-qw4rt -- palisade-ca rotate root"
        ));
        let results = check(&with_admin(
            Ok(rotation("trusting", 20, 300)),
            Ok(metrics("trusting", NOW + 20 * DAY, 0)),
        ));
        assert!(by_check(&results, "ca-root-expiry").ok);
    }

    #[test]
    fn a_ca_without_its_roots_key_is_told_to_take_an_intermediate_from_its_operator() {
        let mut status = rotation("idle", 3000, 10);
        status["root_key_held"] = json!(false);
        let results = check(&with_admin(
            Ok(status),
            Ok(metrics("idle", NOW + 3000 * DAY, 0)),
        ));
        let found = by_check(&results, "ca-intermediate-expiry");
        assert!(!found.ok);
        assert!(
            found
                .fix
                .as_deref()
                .unwrap()
                .contains("rotate intermediate --from-cert F --from-key F --chain F"),
            "{found:?}"
        );
    }

    #[test]
    fn an_intermediate_the_ca_cannot_rotate_says_to_replace_it_by_hand() {
        let mut status = rotation("idle", 3000, 10);
        status["rotatable"] = json!(false);
        let results = check(&with_admin(
            Ok(status),
            Ok(metrics("idle", NOW + 3000 * DAY, 0)),
        ));
        let found = by_check(&results, "ca-intermediate-expiry");
        assert!(!found.ok);
        assert!(
            found
                .fix
                .as_deref()
                .unwrap()
                .contains("replace the intermediate by hand"),
            "{found:?}"
        );
        let results = check(&with_admin(
            Ok(rotation("idle", 3000, 10)),
            Ok(String::new()),
        ));
        let found = by_check(&results, "ca-intermediate-expiry");
        assert!(
            found
                .fix
                .as_deref()
                .unwrap()
                .contains("rotates the intermediate itself at half its life")
        );
    }

    #[test]
    fn an_expired_root_points_to_the_emergency_procedure() {
        let results = check(&with_admin(
            Ok(rotation("idle", -1, 300)),
            Err("down".into()),
        ));
        let found = by_check(&results, "ca-root-expiry");
        assert!(found.message.starts_with("the root expired at"));
        assert!(found.fix.as_deref().unwrap().contains("--emergency"));
    }

    #[test]
    fn the_metrics_stand_in_when_rotation_does_not_answer() {
        let results = check(&with_admin(
            Err("GET /rotation failed: HTTP 503".into()),
            Ok(metrics("idle", NOW + 10 * DAY, 3)),
        ));
        let api = by_check(&results, "ca-api");
        assert!(
            !api.ok && api.message.contains("GET /rotation failed"),
            "{api:?}"
        );
        assert!(!by_check(&results, "ca-root-expiry").ok);
        let lagging = by_check(&results, "proxy-trust-bundle");
        assert!(
            !lagging.ok && lagging.message.starts_with("3 proxies do not trust"),
            "{lagging:?}"
        );
    }

    #[test]
    fn lagging_proxies_are_named_by_pod() {
        let mut status = rotation("trusting", 3000, 300);
        status["proxies"]["lagging"] = json!([{"pod": "shop/api-7d9c-x2", "spiffe_id": "spiffe://cluster.local/ns/shop/sa/api"}]);
        let results = check(&with_admin(
            Ok(status),
            Ok(metrics("trusting", NOW + 3000 * DAY, 1)),
        ));
        let found = by_check(&results, "proxy-trust-bundle");
        assert!(!found.ok);
        assert_eq!(
            found.message,
            "proxy of shop/api-7d9c-x2 (spiffe://cluster.local/ns/shop/sa/api) does not trust every root of the CA's bundle"
        );
        assert!(
            found
                .fix
                .as_deref()
                .unwrap()
                .starts_with("kubectl -n shop logs api-7d9c-x2 -c palisade-proxy")
        );
    }

    #[test]
    fn missing_or_unready_ca_pods_are_red() {
        let results = check(&empty());
        assert_eq!(results.len(), 2);
        assert!(
            results[0]
                .message
                .starts_with("no CA pod in namespace palisade-system")
        );
        assert_eq!(results[1].check, "ca-api");
        let mut s = empty();
        let mut pod = ca_pod();
        pod.status.as_mut().unwrap().conditions = Some(Vec::new());
        pod.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0] = serde_json::from_value(json!({
            "name": "palisade-ca", "ready": false, "restartCount": 0, "image": "c", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff"}}}))
        .unwrap();
        s.pods.push(pod);
        let results = check(&s);
        assert_eq!(
            results[0].message,
            "CA pod palisade-system/palisade-ca-5c7d8f9b6-qw4rt is not ready: container palisade-ca waiting: ImagePullBackOff"
        );
    }
}
