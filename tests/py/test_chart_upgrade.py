"""The webhook's serving certificate and caBundle across `helm upgrade`. With certIssuer chart the
chart looks the Secret up and reuses it, and generates a new one only when it is absent or
incomplete. With certIssuer palisade-ca (the default) the chart neither reads nor renders the
Secret or the caBundle: the CA owns both, and an upgrade must not replace what it wrote.

Helm renders the chart as an upgrade against a fake API server on loopback
(chart_support.fake_kube) that answers the chart's `lookup` the way the API server would."""

from __future__ import annotations

import os



from chart_support import CHART_CERT, CHART_DIR, DEFAULT_NAMESPACE, RELEASE, load_all, render
from chart_support.fake_kube import serve

SECRET_PATH = f"/api/v1/namespaces/{DEFAULT_NAMESPACE}/secrets/palisade-injector-tls"


def render_upgrade(cluster_objects, values=CHART_CERT):
    """Render as `helm upgrade` does, with `lookup` answered by the fake API; (Secret or None,
    MutatingWebhookConfiguration, the paths the chart asked the API for)."""
    import helm_python as helm

    with serve(cluster_objects, DEFAULT_NAMESPACE) as (fake, kubeconfig):
        with helm.Config(kubeconfig_content=kubeconfig, namespace=DEFAULT_NAMESPACE, storage_driver="memory") as cfg, \
                helm.Chart.load(os.fspath(CHART_DIR)) as chart:
            files = cfg.render(chart, values, name=RELEASE, namespace=DEFAULT_NAMESPACE, is_upgrade=True)
    objects = load_all(files["palisade/templates/injector-webhook.yaml"])
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), [o["kind"] for o in objects]
    return by_kind.get("Secret"), by_kind["MutatingWebhookConfiguration"], fake.requests


def live_secret(installed):
    """The Secret as the API server would return it after the install."""
    live = dict(installed)
    live["metadata"] = dict(installed["metadata"], uid="0b5f3c2e-5c1f-4d3e-9a51-3c0f5a6d7e10", resourceVersion="4242",
                            creationTimestamp="2026-01-01T00:00:00Z")
    return live


def test_upgrade_reuses_the_existing_certificate():
    installed = render("chart-cert").one("Secret", "palisade-injector-tls")
    secret, webhook, requests = render_upgrade({SECRET_PATH: live_secret(installed)})
    assert SECRET_PATH in requests, "the chart looked the Secret up"
    assert secret["data"] == installed["data"]
    assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == installed["data"]["ca.crt"]


def test_a_missing_secret_is_generated_afresh():
    installed = render("chart-cert").one("Secret", "palisade-injector-tls")
    secret, webhook, requests = render_upgrade({})
    assert SECRET_PATH in requests
    assert secret["data"]["ca.crt"] != installed["data"]["ca.crt"]
    assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]


def test_an_incomplete_secret_is_replaced():
    # A Secret without the CA (e.g. made by hand with only tls.crt/tls.key) cannot give the
    # caBundle, so a complete new set is generated rather than a webhook that cannot verify.
    installed = render("chart-cert").one("Secret", "palisade-injector-tls")
    partial = live_secret(installed)
    partial["data"] = {k: v for k, v in installed["data"].items() if k != "ca.crt"}
    secret, webhook, _ = render_upgrade({SECRET_PATH: partial})
    assert secret["data"]["tls.crt"] != installed["data"]["tls.crt"]
    assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]


def test_with_palisade_ca_an_upgrade_leaves_the_cas_certificate_alone():
    # A Secret the CA wrote: the chart must not look it up, render it (Helm would take it over
    # and overwrite the CA's renewals) or render a caBundle (the upgrade would reset the CA's).
    installed = render("chart-cert").one("Secret", "palisade-injector-tls")
    by_ca = live_secret(installed)
    by_ca["metadata"] = dict(by_ca["metadata"], labels={"app.kubernetes.io/managed-by": "palisade-ca"})
    secret, webhook, requests = render_upgrade({SECRET_PATH: by_ca}, values={})
    assert secret is None
    assert "caBundle" not in webhook["webhooks"][0]["clientConfig"]
    assert SECRET_PATH not in requests, "the chart does not read the CA's Secret"
