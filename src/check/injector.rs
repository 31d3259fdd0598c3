//! The injector's webhook configuration as the chart installs it (present, selectors, failure
//! scope, a caBundle that verifies the injector's serving certificate, that certificate's
//! expiry), and the MeshPolicy CRD.

use std::collections::BTreeSet;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use palisade_ca_api::contract::INJECT;
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::Pem;

use super::CheckResult;
use super::fetch::{CRD_NAME, INJECTOR_TLS_SECRET, WEBHOOK_CONFIGURATION};
use super::snapshot::{ClusterSnapshot, date};

/// The webhook's name inside the configuration (the chart's `injector-webhook.yaml`).
pub const WEBHOOK_NAME: &str = "sidecar-injector.palisade.dev";
/// Red when the injector's serving certificate expires within this: the API server then
/// refuses every pod of the opted-in namespaces (failurePolicy Fail). A week leaves time to
/// notice; cert-manager renews 30 days ahead, and the chart's own certificate lasts 10 years.
pub const INJECTOR_CERT_WARNING_DAYS: i64 = 7;

/// How much of its life may be left before the injector's certificate is red: a week, or, for
/// a certificate that lives less than four weeks (the CA's own, a day long and renewed at
/// half-life), a quarter of its life — less than that means its renewal is failing. Pure.
pub fn injector_cert_warning_seconds(not_before: i64, not_after: i64) -> i64 {
    let week = INJECTOR_CERT_WARNING_DAYS * 86_400;
    let life = not_after - not_before;
    if life >= 4 * week { week } else { life / 4 }
}
const NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn reinstall(ns: &str) -> String {
    format!("helm upgrade --install palisade charts/palisade -n {ns} (the chart writes it)")
}

pub fn check(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let ns = &s.namespace;
    let config = match &s.webhook {
        Err(e) => {
            return vec![CheckResult::fail(
                "webhook",
                e.clone(),
                "grant the read access, then run again",
            )];
        }
        Ok(None) => {
            return vec![CheckResult::fail(
                "webhook",
                format!(
                    "MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} is missing: no pod gets a proxy"
                ),
                reinstall(ns),
            )];
        }
        Ok(Some(c)) => c,
    };
    let Some(hook) = config
        .webhooks
        .iter()
        .flatten()
        .find(|w| w.name == WEBHOOK_NAME)
    else {
        return vec![CheckResult::fail(
            "webhook",
            format!(
                "MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} has no webhook {WEBHOOK_NAME}"
            ),
            reinstall(ns),
        )];
    };
    let mut out = vec![CheckResult::pass(
        "webhook",
        format!("MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} is installed"),
    )];
    out.push(selectors(hook, ns));
    out.push(failure_scope(hook, ns));
    out.extend(serving_certificate(hook, s));
    out
}

fn expression<'a>(
    selector: Option<&'a LabelSelector>,
    key: &str,
    operator: &str,
) -> Option<BTreeSet<&'a str>> {
    selector?
        .match_expressions
        .iter()
        .flatten()
        .find(|e| e.key == key && e.operator == operator)
        .map(|e| e.values.iter().flatten().map(String::as_str).collect())
}

/// The selectors the chart sets: namespaces labelled `palisade.dev/inject=enabled` (and not
/// kube-system or the control plane's own); pods not labelled `palisade.dev/inject=disabled`.
fn selectors(hook: &MutatingWebhook, ns: &str) -> CheckResult {
    let mut wrong = Vec::new();
    let namespaces = hook.namespace_selector.as_ref();
    if expression(namespaces, INJECT, "In") != Some(BTreeSet::from(["enabled"])) {
        wrong.push(format!(
            "its namespaceSelector does not require {INJECT} In [enabled]"
        ));
    }
    if namespaces.is_some_and(|s| {
        s.match_labels.as_ref().is_some_and(|l| !l.is_empty())
            || s.match_expressions.iter().flatten().any(|e| {
                !matches!(
                    (e.key.as_str(), e.operator.as_str()),
                    (INJECT, "In") | (NAME_LABEL, "NotIn")
                )
            })
    }) {
        wrong.push("its namespaceSelector selects more narrowly than the chart's".to_owned());
    }
    let objects = hook.object_selector.as_ref();
    if expression(objects, INJECT, "NotIn") != Some(BTreeSet::from(["disabled"])) {
        wrong.push(format!(
            "its objectSelector does not leave out pods labelled {INJECT}=disabled"
        ));
    }
    if objects.is_some_and(|s| {
        s.match_labels.as_ref().is_some_and(|l| !l.is_empty())
            || s.match_expressions.as_ref().is_some_and(|e| e.len() != 1)
    }) {
        wrong.push("its objectSelector selects more narrowly than the chart's".to_owned());
    }
    if wrong.is_empty() {
        CheckResult::pass(
            "webhook-selectors",
            format!("namespaces labelled {INJECT}=enabled; pods not labelled {INJECT}=disabled"),
        )
    } else {
        CheckResult::fail(
            "webhook-selectors",
            format!("webhook {WEBHOOK_NAME}: {}", wrong.join("; ")),
            format!(
                "{}; or restore by hand: namespaceSelector {INJECT} In [enabled] and {NAME_LABEL} NotIn [kube-system, {ns}], objectSelector {INJECT} NotIn [disabled]",
                reinstall(ns)
            ),
        )
    }
}

/// The chart fails closed (failurePolicy Fail, also the default of admissionregistration/v1):
/// a pod of an opted-in namespace never starts without its proxy. An injector outage then
/// refuses every pod the webhook selects, so kube-system and the control plane's own namespace
/// must never be among them, or the injector cannot come back.
fn failure_scope(hook: &MutatingWebhook, ns: &str) -> CheckResult {
    let policy = hook.failure_policy.as_deref().unwrap_or("Fail");
    if policy != "Fail" {
        return CheckResult::fail(
            "webhook-failure-scope",
            format!(
                "failurePolicy {policy}: while the injector is down, pods of opted-in namespaces start without the proxy, unprotected and unnoticed"
            ),
            format!(
                "set failurePolicy: Fail, as the chart does: {}",
                reinstall(ns)
            ),
        );
    }
    let selector = hook.namespace_selector.as_ref();
    let not_in = expression(selector, NAME_LABEL, "NotIn").unwrap_or_default();
    let only_in = expression(selector, NAME_LABEL, "In");
    let excluded =
        |name: &str| not_in.contains(name) || only_in.as_ref().is_some_and(|i| !i.contains(name));
    let exposed: Vec<&str> = ["kube-system", ns]
        .into_iter()
        .filter(|n| !excluded(n))
        .collect();
    if exposed.is_empty() {
        CheckResult::pass(
            "webhook-failure-scope",
            format!("failurePolicy Fail, and kube-system and {ns} are excluded by name"),
        )
    } else {
        CheckResult::fail(
            "webhook-failure-scope",
            format!(
                "failurePolicy Fail, and the namespaceSelector does not exclude {}: while the injector is down, their pods (the injector's own among them) could not start",
                exposed.join(" and ")
            ),
            format!(
                "add {NAME_LABEL} NotIn [kube-system, {ns}] to the namespaceSelector: {}",
                reinstall(ns)
            ),
        )
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<Pem>, String> {
    let list: Vec<Pem> = Pem::iter_from_buffer(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if list.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(list)
}

fn parse(pem: &Pem) -> Result<X509Certificate<'_>, String> {
    pem.parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// Whether `leaf` chains to one of `roots`, through `intermediates` if needed.
fn chains_to(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    roots: &[X509Certificate<'_>],
) -> bool {
    let mut current = leaf;
    for _ in 0..=intermediates.len() {
        let signed_by = |issuer: &X509Certificate<'_>| {
            issuer.subject() == current.issuer()
                && current.verify_signature(Some(issuer.public_key())).is_ok()
        };
        if roots.iter().any(signed_by) {
            return true;
        }
        match intermediates.iter().find(|i| signed_by(i)) {
            Some(next) => current = next,
            None => return false,
        }
    }
    false
}

fn serving_certificate(hook: &MutatingWebhook, s: &ClusterSnapshot) -> Vec<CheckResult> {
    let ns = &s.namespace;
    let regenerate = format!(
        "kubectl -n {ns} delete secret {INJECTOR_TLS_SECRET}, then {} (a new CA and certificate are generated when the Secret is absent), then kubectl -n {ns} rollout restart deployment/palisade-injector",
        reinstall(ns)
    );
    let secret = match &s.injector_secret {
        Err(e) => {
            return vec![CheckResult::fail(
                "webhook-ca-bundle",
                e.clone(),
                "grant the read access, then run again",
            )];
        }
        Ok(None) => {
            return vec![CheckResult::fail(
                "webhook-ca-bundle",
                format!(
                    "Secret {ns}/{INJECTOR_TLS_SECRET} (the injector's serving certificate) is missing: the injector cannot start"
                ),
                reinstall(ns),
            )];
        }
        Ok(Some(secret)) => secret,
    };
    let Some(tls) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return vec![CheckResult::fail(
            "webhook-ca-bundle",
            format!("Secret {ns}/{INJECTOR_TLS_SECRET} has no tls.crt"),
            regenerate,
        )];
    };
    let Some(bundle) = hook
        .client_config
        .ca_bundle
        .as_ref()
        .filter(|b| !b.0.is_empty())
    else {
        return vec![CheckResult::fail(
            "webhook-ca-bundle",
            format!(
                "webhook {WEBHOOK_NAME} has no caBundle: the API server cannot verify the injector"
            ),
            format!(
                "{}; with cert-manager, check that its cainjector runs",
                reinstall(ns)
            ),
        )];
    };
    let (served, trusted) = match (certificates(&tls.0), certificates(&bundle.0)) {
        (Ok(served), Ok(trusted)) => (served, trusted),
        (Err(e), _) => {
            return vec![CheckResult::fail(
                "webhook-ca-bundle",
                format!("tls.crt of Secret {ns}/{INJECTOR_TLS_SECRET}: {e}"),
                regenerate,
            )];
        }
        (_, Err(e)) => {
            return vec![CheckResult::fail(
                "webhook-ca-bundle",
                format!("the caBundle of webhook {WEBHOOK_NAME}: {e}"),
                regenerate,
            )];
        }
    };
    let parsed = served.iter().map(parse).collect::<Result<Vec<_>, _>>();
    let roots = trusted.iter().map(parse).collect::<Result<Vec<_>, _>>();
    let (chain, roots) = match (parsed, roots) {
        (Ok(c), Ok(r)) => (c, r),
        (Err(e), _) | (_, Err(e)) => {
            return vec![CheckResult::fail(
                "webhook-ca-bundle",
                format!("the injector's certificate or the caBundle: {e}"),
                regenerate,
            )];
        }
    };
    let leaf = &chain[0];
    let mut out = Vec::new();
    if chains_to(leaf, &chain[1..], &roots) {
        out.push(CheckResult::pass(
            "webhook-ca-bundle",
            format!(
                "the caBundle verifies the injector's serving certificate ({})",
                leaf.subject()
            ),
        ));
    } else {
        out.push(CheckResult::fail(
            "webhook-ca-bundle",
            format!(
                "the caBundle of webhook {WEBHOOK_NAME} does not verify the injector's serving certificate (Secret {ns}/{INJECTOR_TLS_SECRET}, issuer {}): the API server refuses the webhook, so pods of opted-in namespaces cannot be created",
                leaf.issuer()
            ),
            regenerate.clone(),
        ));
    }
    let not_after = leaf.validity().not_after.timestamp();
    let warning = injector_cert_warning_seconds(leaf.validity().not_before.timestamp(), not_after);
    let left = not_after - s.now;
    let when = date(not_after);
    out.push(if left <= 0 {
        CheckResult::fail("injector-cert-expiry", format!("the injector's serving certificate expired at {when}"), regenerate)
    } else if left < warning {
        CheckResult::fail(
            "injector-cert-expiry",
            format!(
                "the injector's serving certificate expires at {when} (in {} hours, under {}): it is not being renewed",
                left / 3600,
                if warning % 86_400 == 0 { format!("{} days", warning / 86_400) } else { format!("{} hours", warning / 3600) }
            ),
            format!("{regenerate}; with cert-manager: kubectl -n {ns} describe certificate palisade-injector; with the CA's certificate (injector.webhook.certIssuer: palisade-ca): kubectl -n {ns} logs deploy/palisade-ca | grep injector"),
        )
    } else {
        CheckResult::pass(
            "injector-cert-expiry",
            format!("the injector's serving certificate expires at {when} (in {} days)", left / 86_400),
        )
    });
    out
}

/// The MeshPolicy CRD is installed and serves every version this binary knows.
pub fn check_crd(s: &ClusterSnapshot) -> Vec<CheckResult> {
    let apply = "kubectl apply -f charts/palisade/crds/meshpolicies.palisade.dev.yaml (Helm installs CRDs but never upgrades them), or: palisade-ca crd | kubectl apply -f -";
    let crd = match &s.crd {
        Err(e) => {
            return vec![CheckResult::fail(
                "crd",
                e.clone(),
                "grant the read access, then run again",
            )];
        }
        Ok(None) => {
            return vec![CheckResult::fail(
                "crd",
                format!("CRD {CRD_NAME} is not installed: the CA cannot watch MeshPolicies"),
                apply,
            )];
        }
        Ok(Some(crd)) => crd,
    };
    let known = palisade_ca::kube::crd::crd_document();
    let wanted: Vec<String> = known["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] == true)
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let served: Vec<&str> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .map(String::as_str)
        .filter(|v| !served.contains(v))
        .collect();
    let result = if missing.is_empty() {
        CheckResult::pass("crd", format!("{CRD_NAME} serves {}", served.join(", ")))
    } else {
        CheckResult::fail(
            "crd",
            format!(
                "{CRD_NAME} serves [{}], and this version of Palisade needs {}",
                served.join(", "),
                missing.join(", ")
            ),
            apply,
        )
    };
    vec![result]
}

#[cfg(test)]
mod tests {
    use palisade_testkit::pki::webhook_serving;
    use serde_json::json;

    use super::*;
    use crate::check::test_support::{empty, injector_secret, webhook};

    const NAMES: [&str; 2] = ["palisade-injector.palisade-system.svc", "palisade-injector"];

    /// The chart's webhook and Secret, with a serving certificate valid for `days`.
    fn installed(days: i64) -> (ClusterSnapshot, serde_json::Value) {
        let pki = webhook_serving(&NAMES, days);
        let mut s = empty();
        s.now = time::OffsetDateTime::now_utc().unix_timestamp();
        s.injector_secret = Ok(Some(
            serde_json::from_value(injector_secret(&pki.cert_pem)).unwrap(),
        ));
        (s, webhook(&pki.ca_pem))
    }

    fn run(mut s: ClusterSnapshot, config: serde_json::Value) -> Vec<CheckResult> {
        s.webhook = Ok(Some(serde_json::from_value(config).unwrap()));
        check(&s)
    }

    fn red(results: &[CheckResult]) -> Vec<(&'static str, String)> {
        results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| (r.check, r.message.clone()))
            .collect()
    }

    #[test]
    fn the_charts_webhook_is_all_green() {
        let (s, config) = installed(3650);
        let results = run(s, config);
        let checks: Vec<(&str, bool)> = results.iter().map(|r| (r.check, r.ok)).collect();
        assert_eq!(
            checks,
            [
                ("webhook", true),
                ("webhook-selectors", true),
                ("webhook-failure-scope", true),
                ("webhook-ca-bundle", true),
                ("injector-cert-expiry", true),
            ]
        );
    }

    #[test]
    fn a_missing_webhook_is_red_with_the_install_command() {
        let (s, _) = installed(3650);
        let results = check(&s);
        assert_eq!(
            red(&results),
            [(
                "webhook",
                "MutatingWebhookConfiguration palisade-injector is missing: no pod gets a proxy"
                    .to_owned()
            )]
        );
        assert!(
            results[0]
                .fix
                .as_deref()
                .unwrap()
                .starts_with("helm upgrade --install")
        );
    }

    #[test]
    fn selectors_that_differ_from_the_charts_are_named() {
        let (s, mut config) = installed(3650);
        config["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"] =
            json!(["true"]);
        config["webhooks"][0]["objectSelector"] = json!({});
        let found = red(&run(s, config));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "webhook-selectors");
        assert!(
            found[0]
                .1
                .contains("does not require palisade.dev/inject In [enabled]")
        );
        assert!(found[0].1.contains(
            "objectSelector does not leave out pods labelled palisade.dev/inject=disabled"
        ));
    }

    #[test]
    fn failing_closed_over_kube_system_is_red() {
        let (s, mut config) = installed(3650);
        config["webhooks"][0]["namespaceSelector"]["matchExpressions"][1]["values"] =
            json!(["palisade-system"]);
        let found = red(&run(s.clone(), config.clone()));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.starts_with(
            "failurePolicy Fail, and the namespaceSelector does not exclude kube-system:"
        ));
        config["webhooks"][0]["failurePolicy"] = json!("Ignore");
        let found = red(&run(s, config));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.starts_with("failurePolicy Ignore: while the injector is down, pods of opted-in namespaces start without the proxy"));
    }

    #[test]
    fn a_ca_bundle_of_another_ca_is_red() {
        let (s, _) = installed(3650);
        let other = webhook_serving(&NAMES, 3650);
        let found = red(&run(s, webhook(&other.ca_pem)));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "webhook-ca-bundle");
        assert!(
            found[0]
                .1
                .contains("does not verify the injector's serving certificate")
        );
    }

    #[test]
    fn a_serving_certificate_near_expiry_is_red() {
        let (s, config) = installed(3);
        let found = red(&run(s, config));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "injector-cert-expiry");
        assert!(found[0].1.contains("under 7 days"), "{found:?}");
        let (s, config) = installed(-1);
        assert!(red(&run(s, config))[0].1.contains("expired at"));
    }

    #[test]
    fn the_cas_day_long_certificate_is_red_only_once_its_renewal_is_late() {
        let day = 86_400;
        assert_eq!(injector_cert_warning_seconds(0, day), day / 4);
        assert_eq!(injector_cert_warning_seconds(0, 3650 * day), 7 * day);
        assert_eq!(injector_cert_warning_seconds(0, 28 * day), 7 * day);
        let pki = |from_hours: i64, to_hours: i64| {
            palisade_testkit::pki::webhook_serving_between(&NAMES, from_hours, to_hours)
        };
        for (from, to, red_expected) in [(-4, 20, false), (-19, 5, true)] {
            let p = pki(from, to);
            let mut s = empty();
            s.now = time::OffsetDateTime::now_utc().unix_timestamp();
            s.injector_secret = Ok(Some(
                serde_json::from_value(injector_secret(&p.cert_pem)).unwrap(),
            ));
            let found = red(&run(s, webhook(&p.ca_pem)));
            assert_eq!(!found.is_empty(), red_expected, "{from}h..{to}h: {found:?}");
            if red_expected {
                assert!(found[0].1.contains("under 6 hours"), "{found:?}");
            }
        }
    }

    #[test]
    fn garbage_in_the_secret_is_one_red_line() {
        let (mut s, config) = installed(3650);
        s.injector_secret = Ok(Some(
            serde_json::from_value(injector_secret("not a certificate")).unwrap(),
        ));
        let found = red(&run(s, config));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].1.starts_with(
                "tls.crt of Secret palisade-system/palisade-injector-tls: no certificate"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn the_crd_must_serve_every_version_this_binary_knows() {
        let mut s = empty();
        let crd = |version: &str| {
            let mut doc = palisade_ca::kube::crd::crd_document();
            doc["spec"]["versions"][0]["name"] = json!(version);
            Ok(Some(serde_json::from_value(doc).unwrap()))
        };
        s.crd = crd("v1alpha1");
        assert!(check_crd(&s)[0].ok);
        s.crd = crd("v1beta9");
        let found = &check_crd(&s)[0];
        assert_eq!(
            found.message,
            "meshpolicies.palisade.dev serves [v1beta9], and this version of Palisade needs v1alpha1"
        );
        s.crd = Ok(None);
        assert!(check_crd(&s)[0].message.contains("is not installed"));
    }
}
