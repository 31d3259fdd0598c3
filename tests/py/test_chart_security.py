"""What the rendered chart promises about access, admission and isolation: the CA's RBAC exactly,
the webhook's scope and failure policy, Pod Security "restricted" on every control-plane
container, who provides the webhook's serving certificate and caBundle (and, when the chart does,
the certificate against its caBundle), the NetworkPolicies, and the command lines DESIGN.md
fixes."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from chart_support import (
    VALUE_SETS,
    cert_issuer,
    command_line,
    containers,
    install_dry_run,
    load_all,
    render,
    render_chart_cert,
)

ALL = list(VALUE_SETS)

# Kubernetes mode of palisade-ca (issue 5, docs/rbac.md): the verbs per (apiGroup, resource), as
# the default (injector.webhook.certIssuer palisade-ca) grants them.
CA_CLUSTER_ACCESS = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("", "services"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("palisade.dev", "meshpolicies"): {"get", "list", "watch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "configmaps"): {"get", "create", "update"},
    # --manage-injector-tls: the webhook's caBundle.
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): {"get", "update"},
}
CA_NAMESPACED_ACCESS = {
    ("", "secrets"): {"get", "create", "update"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    ("", "configmaps"): {"list", "patch", "delete"},
}
# With certIssuer chart or cert-manager the CA does not touch the webhook.
CA_CLUSTER_ACCESS_WITHOUT_INJECTOR_TLS = {
    k: v for k, v in CA_CLUSTER_ACCESS.items() if k[1] != "mutatingwebhookconfigurations"
}
# The Secrets the CA may get and update, by name, per certIssuer.
CA_SECRETS = {
    "palisade-ca": ["palisade-ca-keys", "palisade-injector-tls"],
    "chart": ["palisade-ca-keys"],
    "cert-manager": ["palisade-ca-keys"],
}


def access(rules):
    """Flatten RBAC rules into {(apiGroup, resource): verbs}, rejecting wildcards."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
            assert not any("*" in v for v in rule.get(field, [])), f"wildcard in {field}: {rule}"
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("name", ALL)
def test_ca_rbac_is_exactly_what_kubernetes_mode_needs(name):
    rendered = render(name)
    ns = rendered.value_set.namespace
    assert [r["metadata"]["name"] for r in rendered.of_kind("ClusterRole")] == ["palisade-ca"]
    assert [r["metadata"]["name"] for r in rendered.of_kind("Role")] == ["palisade-ca"]
    issuer = cert_issuer(rendered.value_set)
    expected = CA_CLUSTER_ACCESS if issuer == "palisade-ca" else CA_CLUSTER_ACCESS_WITHOUT_INJECTOR_TLS
    assert access(rendered.one("ClusterRole", "palisade-ca")["rules"]) == expected
    role = rendered.one("Role", "palisade-ca")
    assert role["metadata"]["namespace"] == ns
    assert access(role["rules"]) == CA_NAMESPACED_ACCESS
    # Reads and updates of Secrets and Leases are limited to the CA's own by name (and, when it
    # issues the webhook's certificate, that Secret); only create (which cannot be limited by
    # name) is open, and only in the release namespace. The proxy reports' ConfigMaps are named
    # after pods: list, patch and delete in this namespace only.
    own = {"secrets": CA_SECRETS[issuer], "leases": ["palisade-ca-rotation"]}
    for rule in role["rules"]:
        (resource,) = rule["resources"]
        if resource == "configmaps":
            assert set(rule["verbs"]) == {"list", "patch", "delete"}, rule
        elif set(rule["verbs"]) & {"get", "update"}:
            assert rule["resourceNames"] == own[resource], rule
            assert set(rule["verbs"]) == {"get", "update"}, rule
        else:
            assert rule["verbs"] == ["create"] and "resourceNames" not in rule, rule
    # ConfigMaps: read and updated only by the trust anchors' name; create alone is open (it
    # cannot be limited by name). No list or watch of ConfigMaps at all.
    for rule in rendered.one("ClusterRole", "palisade-ca")["rules"]:
        if "configmaps" not in rule["resources"]:
            continue
        assert rule["resources"] == ["configmaps"], rule
        if set(rule["verbs"]) & {"get", "update"}:
            assert rule["resourceNames"] == ["palisade-trust-anchors"], rule
            assert set(rule["verbs"]) == {"get", "update"}, rule
        else:
            assert rule["verbs"] == ["create"] and "resourceNames" not in rule, rule
    # The webhook configuration: only palisade-injector, by name, and only get and update.
    webhook_rules = [r for r in rendered.one("ClusterRole", "palisade-ca")["rules"]
                     if "mutatingwebhookconfigurations" in r["resources"]]
    if issuer == "palisade-ca":
        assert webhook_rules == [{
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["palisade-injector"],
            "verbs": ["get", "update"],
        }]
    else:
        assert webhook_rules == []
    # No secrets anywhere cluster-wide.
    assert not any("secrets" in r["resources"] for r in rendered.one("ClusterRole", "palisade-ca")["rules"])

    sa_ca = {"kind": "ServiceAccount", "name": "palisade-ca", "namespace": ns}
    crb = rendered.one("ClusterRoleBinding", "palisade-ca")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "palisade-ca"}
    assert crb["subjects"] == [sa_ca]
    rb = rendered.one("RoleBinding", "palisade-ca")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "palisade-ca"}
    assert rb["subjects"] == [sa_ca]
    # Nothing else is bound: the injector has no API permissions at all.
    assert len(rendered.of_kind("ClusterRoleBinding")) == 1
    assert len(rendered.of_kind("RoleBinding")) == 1


def test_rbac_check_rejects_a_wildcard():
    with pytest.raises(AssertionError, match="wildcard"):
        access([{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}])


@pytest.mark.parametrize("name", ALL)
def test_injector_has_no_api_token(name):
    rendered = render(name)
    assert rendered.one("ServiceAccount", "palisade-injector")["automountServiceAccountToken"] is False
    pod = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "palisade-injector"
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", ALL)
def test_webhook_scope_and_failure_policy(name):
    rendered = render(name)
    ns = rendered.value_set.namespace
    (mwc,) = rendered.of_kind("MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    assert hook["clientConfig"]["service"] == {"name": "palisade-injector", "namespace": ns, "path": "/mutate", "port": 443}
    assert hook["rules"] == [
        {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}
    ]
    excluded = ["kube-system", ns] + rendered.value_set.values.get("injector", {}).get("excludeNamespaces", [])
    assert hook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "palisade.dev/inject", "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
        ]
    }
    assert "matchLabels" not in hook["namespaceSelector"]
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": "palisade.dev/inject", "operator": "NotIn", "values": ["disabled"]}]
    }
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] == 5
    assert hook["reinvocationPolicy"] == "IfNeeded"

    svc = rendered.one("Service", "palisade-injector")
    webhook_port = [p for p in svc["spec"]["ports"] if p["port"] == 443]
    assert webhook_port and webhook_port[0]["targetPort"] == "https-webhook"
    injector = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "https-webhook", "containerPort": 15017, "protocol": "TCP"} in injector["ports"]


CONTROL_PLANE_DEPLOYMENTS = ["palisade-ca", "palisade-injector"]


def assert_restricted(pod_spec, where):
    """Pod Security Standards, profile "restricted" (v1.29+), plus a read-only root."""
    psc = pod_spec.get("securityContext", {})
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), where
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    assert not psc.get("sysctls"), where
    assert psc.get("seLinuxOptions", {}).get("type", "container_t") in {"container_t", "container_init_t", "container_kvm_t"}, where
    for vol in pod_spec.get("volumes", []):
        assert set(vol) - {"name"} <= {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}, (where, vol)
    for c in containers(pod_spec):
        at = f"{where}/{c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, at
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, at
        assert sc.get("allowPrivilegeEscalation") is False, at
        assert sc.get("privileged", False) is False, at
        assert sc.get("readOnlyRootFilesystem") is True, at
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
        assert not sc.get("capabilities", {}).get("add"), at
        assert sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") == "RuntimeDefault", at
        assert sc.get("procMount", "Default") == "Default", at
        assert sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") in {"RuntimeDefault", "Localhost"}, at
        for p in c.get("ports", []):
            assert "hostPort" not in p, at
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{at}: {kind}"


@pytest.mark.parametrize("name", ALL)
def test_every_control_plane_container_is_restricted(name):
    rendered = render(name)
    deployments = rendered.of_kind("Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == CONTROL_PLANE_DEPLOYMENTS
    for d in deployments:
        assert_restricted(d["spec"]["template"]["spec"], d["metadata"]["name"])


def test_restricted_check_catches_a_writable_root():
    pod = render("default").one("Deployment", "palisade-ca")["spec"]["template"]["spec"]
    broken = dict(pod, containers=[dict(pod["containers"][0], securityContext={"allowPrivilegeEscalation": False})])
    with pytest.raises(AssertionError):
        assert_restricted(broken, "broken")


@pytest.mark.parametrize("name", ALL)
def test_probes_are_on_the_admin_port(name):
    rendered = render(name)
    for d in CONTROL_PLANE_DEPLOYMENTS:
        (c,) = rendered.one("Deployment", d)["spec"]["template"]["spec"]["containers"]
        assert {"name": "http-admin", "containerPort": 15014, "protocol": "TCP"} in c["ports"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-admin"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http-admin"}


@pytest.mark.parametrize("name", ALL)
def test_ca_command_line(name):
    rendered = render(name)
    vs = rendered.value_set
    ns = vs.namespace
    dep = rendered.one("Deployment", "palisade-ca")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sub, flags = command_line(c["args"])
    assert sub == "serve"
    external = vs.values.get("ca", {}).get("externalCA", {})
    external_flags = {}
    if external.get("type") == "root":
        external_flags = {"--root-cert": "/etc/palisade/external-ca/tls.crt", "--root-key": "/etc/palisade/external-ca/tls.key"}
    elif external.get("secretName"):
        external_flags = {
            "--intermediate-cert": "/etc/palisade/external-ca/tls.crt",
            "--intermediate-key": "/etc/palisade/external-ca/tls.key",
            "--intermediate-chain": "/etc/palisade/external-ca/ca.crt",
        }
    assert flags == {
        **external_flags,
        "--source": "kube",
        "--auth": "kube",
        "--namespace": ns,
        "--trust-domain": vs.values.get("trustDomain", "cluster.local"),
        "--cert-ttl": vs.values.get("ca", {}).get("certTTL", "1h"),
        "--state-dir": "/var/lib/palisade",
        "--listen": "0.0.0.0:15012",
        "--admin-listen": "0.0.0.0:15014",
        # certIssuer palisade-ca (the default): the CA issues the webhook's certificate.
        **({"--manage-injector-tls": True} if cert_issuer(vs) == "palisade-ca" else {}),
    }
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/palisade"]]
    if external.get("secretName"):
        assert volumes[mounts["/etc/palisade/external-ca"]]["secret"]["secretName"] == external["secretName"]
    else:
        assert "/etc/palisade/external-ca" not in mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PALISADE_DEFAULT_POLICY"] == vs.values.get("defaultPolicy", "all-authenticated")
    svc = rendered.one("Service", "palisade-ca")
    assert {(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {(15012, "https-api"), (15014, "http-admin")}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {"name": "https-api", "containerPort": 15012, "protocol": "TCP"} in c["ports"]


@pytest.mark.parametrize("name", ALL)
def test_injector_command_line(name):
    rendered = render(name)
    vs = rendered.value_set
    (c,) = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["containers"]
    sub, flags = command_line(c["args"])
    assert sub == "serve"
    native = vs.values.get("injector", {}).get("nativeSidecar", True)
    proxy_image = flags.pop("--proxy-image")
    assert flags == {
        "--tls-cert": "/etc/palisade/webhook/tls.crt",
        "--tls-key": "/etc/palisade/webhook/tls.key",
        "--listen": "0.0.0.0:15017",
        "--admin-listen": "0.0.0.0:15014",
        "--ca-addr": f"palisade-ca.{vs.namespace}.svc:15012",
        "--native-sidecar": "true" if native else "false",
        "--ip-families": ",".join(vs.values.get("injector", {}).get("ipFamilies", ["IPv4", "IPv6"])),
        # The CA's trust domain: proxies ask for identities in it (both sides from trustDomain).
        "--trust-domain": vs.values.get("trustDomain", "cluster.local"),
    }
    assert "/palisade-proxy" in proxy_image
    env = {e["name"]: e.get("value") for e in c["env"]}
    proxy = vs.values.get("proxy", {})
    cpu_limit = proxy.get("resources", {}).get("limits", {}).get("cpu")
    # The flags' environment twins in palisade-injector's command line (injector/src/cli.rs).
    assert env == {
        "PALISADE_LOG": vs.values.get("log", {}).get("level", "info"),
        "PALISADE_LOG_FORMAT": vs.values.get("log", {}).get("format", "json"),
        "PALISADE_CA_NAME": f"palisade-ca.{vs.namespace}.svc",
        "PALISADE_PROXY_CPU_REQUEST": "100m",
        "PALISADE_PROXY_MEMORY_REQUEST": "64Mi",
        "PALISADE_PROXY_MEMORY_LIMIT": "256Mi",
        "PALISADE_PROXY_LOG_LEVEL": proxy.get("log", {}).get("level", "info"),
        **({"PALISADE_PROXY_CPU_LIMIT": cpu_limit} if cpu_limit else {}),
    }
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/etc/palisade/webhook" and mount["readOnly"] is True


def test_images_follow_the_values():
    default = render("default")
    (ca,) = default.one("Deployment", "palisade-ca")["spec"]["template"]["spec"]["containers"]
    assert ca["image"] == "ghcr.io/palisade-mesh/palisade-ca:0.1.0"
    assert ca["imagePullPolicy"] == "IfNotPresent"
    pinned = render("pinned-digests")
    pod = pinned.one("Deployment", "palisade-ca")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com:5000/mirror/palisade-ca@sha256:" + "a" * 64
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "mirror-creds"}]
    (inj,) = pinned.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["containers"]
    _, flags = command_line(inj["args"])
    assert flags["--proxy-image"] == "registry.example.com:5000/mirror/palisade-proxy:0.1.1"


def _cert(b64):
    return x509.load_pem_x509_certificate(base64.b64decode(b64))


def verify_signed_by(cert, issuer):
    key = issuer.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    else:
        raise AssertionError(f"unexpected key type {type(key)}")


@pytest.mark.parametrize("name", [n for n in ALL if n != "cert-manager"])
def test_ca_bundle_verifies_the_serving_certificate(name):
    # Every value set with certIssuer chart, the one mode in which the chart makes the pair.
    rendered = render_chart_cert(name)
    ns = rendered.value_set.namespace
    secret = rendered.one("Secret", "palisade-injector-tls")
    assert secret["type"] == "kubernetes.io/tls"
    (hook,) = rendered.one("MutatingWebhookConfiguration", "palisade-injector")["webhooks"]
    bundle = hook["clientConfig"]["caBundle"]
    assert bundle == secret["data"]["ca.crt"]
    ca = _cert(bundle)
    serving = _cert(secret["data"]["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert serving.issuer == ca.subject
    verify_signed_by(serving, ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    # The API server calls https://palisade-injector.<ns>.svc:443/mutate.
    assert f"palisade-injector.{ns}.svc" in sans
    assert set(sans) <= {
        "palisade-injector",
        f"palisade-injector.{ns}",
        f"palisade-injector.{ns}.svc",
        f"palisade-injector.{ns}.svc.cluster.local",
    }
    now = datetime.datetime.now(datetime.timezone.utc)
    assert serving.not_valid_before_utc <= now < serving.not_valid_after_utc
    assert serving.not_valid_after_utc - now > datetime.timedelta(days=365)
    # The key in the Secret is the serving certificate's key.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), password=None)
    assert key.public_key().public_numbers() == serving.public_key().public_numbers()


def test_ca_bundle_check_catches_a_foreign_ca():
    a, b = render_chart_cert("default"), render_chart_cert("ha-off")  # two independent generations
    ca_b = _cert(b.one("Secret", "palisade-injector-tls")["data"]["ca.crt"])
    serving_a = _cert(a.one("Secret", "palisade-injector-tls")["data"]["tls.crt"])
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        verify_signed_by(serving_a, ca_b)


def test_cert_manager_provides_the_certificate_instead():
    rendered = render("cert-manager")
    ns = rendered.value_set.namespace
    assert rendered.of_kind("Secret") == []
    mwc = rendered.one("MutatingWebhookConfiguration", "palisade-injector")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/palisade-injector"
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    cert = rendered.one("Certificate", "palisade-injector")
    assert cert["spec"]["secretName"] == "palisade-injector-tls"
    assert f"palisade-injector.{ns}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "palisade-injector-selfsigned", "kind": "Issuer", "group": "cert-manager.io"}
    assert rendered.one("Issuer", "palisade-injector-selfsigned")["spec"] == {"selfSigned": {}}


@pytest.mark.parametrize("issuer", ["palisade-ca", "chart"])
def test_cert_manager_wins_over_cert_issuer(issuer):
    values = {"injector": {"webhook": {"certIssuer": issuer, "certManager": {"enabled": True}}}}
    objects = load_all(install_dry_run(values, api_versions=("cert-manager.io/v1",))["manifest"])
    kinds = [o["kind"] for o in objects]
    assert "Secret" not in kinds and kinds.count("Certificate") == 1
    (mwc,) = [o for o in objects if o["kind"] == "MutatingWebhookConfiguration"]
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    (ca,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "palisade-ca"]
    assert "--manage-injector-tls" not in ca["spec"]["template"]["spec"]["containers"][0]["args"]
    (role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert access(role["rules"]) == CA_CLUSTER_ACCESS_WITHOUT_INJECTOR_TLS


@pytest.mark.parametrize("name", [n for n in ALL if cert_issuer(VALUE_SETS[n]) == "palisade-ca"])
def test_palisade_ca_provides_the_certificate_by_default(name):
    # certIssuer palisade-ca: the CA writes the Secret and sets the caBundle at run time, so
    # the chart renders neither (a rendered caBundle would be reset at every upgrade, and a
    # rendered Secret would be Helm's to overwrite).
    rendered = render(name)
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == []
    assert rendered.of_kind("Certificate") == [] and rendered.of_kind("Issuer") == []
    mwc = rendered.one("MutatingWebhookConfiguration", "palisade-injector")
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    assert "cert-manager.io/inject-ca-from" not in mwc["metadata"].get("annotations", {})
    (ca,) = rendered.one("Deployment", "palisade-ca")["spec"]["template"]["spec"]["containers"]
    assert ca["args"].count("--manage-injector-tls") == 1
    # The injector still mounts the Secret by that name, which the CA writes.
    volumes = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["volumes"]
    assert [v["secret"]["secretName"] for v in volumes if "secret" in v] == ["palisade-injector-tls"]


@pytest.mark.parametrize("name", [n for n in ALL if cert_issuer(VALUE_SETS[n]) != "palisade-ca"])
def test_only_palisade_ca_mode_passes_the_flag(name):
    (ca,) = render(name).one("Deployment", "palisade-ca")["spec"]["template"]["spec"]["containers"]
    assert "--manage-injector-tls" not in ca["args"]


@pytest.mark.parametrize("name", ALL)
def test_network_policies_segment_the_control_plane(name):
    rendered = render(name)
    monitoring_ns = rendered.value_set.values.get("monitoring", {}).get("namespace", "monitoring")
    ca = rendered.one("NetworkPolicy", "palisade-ca")["spec"]
    assert ca["podSelector"]["matchLabels"] == rendered.one("Deployment", "palisade-ca")["spec"]["selector"]["matchLabels"]
    assert ca["policyTypes"] == ["Ingress"]
    assert ca["ingress"] == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"palisade.dev/inject": "enabled"}}}],
            "ports": [{"port": 15012, "protocol": "TCP"}],
        },
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_ns}}}],
            "ports": [{"port": 15014, "protocol": "TCP"}],
        },
    ] + (
        [{"from": [{"ipBlock": {"cidr": c}} for c in cidrs], "ports": [{"port": 15014, "protocol": "TCP"}]}]
        if (cidrs := rendered.value_set.values.get("networkPolicy", {}).get("apiServerCIDRs"))
        else []
    )
    inj = rendered.one("NetworkPolicy", "palisade-injector")["spec"]
    assert inj["podSelector"]["matchLabels"] == rendered.one("Deployment", "palisade-injector")["spec"]["selector"]["matchLabels"]
    assert inj["policyTypes"] == ["Ingress"]
    expected = [{"ports": [{"port": 15017, "protocol": "TCP"}]}]
    if rendered.of_kind("ServiceMonitor"):
        expected.append(
            {
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": monitoring_ns}}}],
                "ports": [{"port": 15014, "protocol": "TCP"}],
            }
        )
    assert inj["ingress"] == expected


def test_tls_handshake_with_the_rendered_certificate(tmp_path):
    """What the API server does when it calls the webhook: a TLS handshake to
    palisade-injector.<ns>.svc that trusts only the caBundle. Served by OpenSSL (Python's ssl)
    on loopback with the Secret's tls.crt and tls.key."""
    import socket
    import ssl
    import threading

    rendered = render_chart_cert("custom-namespace-trust-domain")
    ns = rendered.value_set.namespace
    data = rendered.one("Secret", "palisade-injector-tls")["data"]
    (hook,) = rendered.one("MutatingWebhookConfiguration", "palisade-injector")["webhooks"]
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_bytes(base64.b64decode(data[name]))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    def handshake(server_name):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    return tls.version()
        finally:
            thread.join(timeout=10)
            listener.close()

    assert handshake(f"palisade-injector.{ns}.svc") in {"TLSv1.2", "TLSv1.3"}
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("palisade-injector.elsewhere.svc")
