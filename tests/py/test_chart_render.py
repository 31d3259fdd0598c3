"""The chart renders with Helm's engine for every value set, and every object it renders (and
the MeshPolicy CRD) validates strictly against Kubernetes' own schemas."""

from __future__ import annotations

import pytest
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

from chart_support import CHART_DIR, KUBE_MIN, VALUE_SETS, crd_documents, install_dry_run, render

KUBE_NEWEST = kubernetes_validate.utils.latest_version()
KUBE_VERSIONS = [KUBE_MIN, KUBE_NEWEST]

CONTROL_PLANE = {
    ("ServiceAccount", "palisade-ca"),
    ("ServiceAccount", "palisade-injector"),
    ("ClusterRole", "palisade-ca"),
    ("ClusterRoleBinding", "palisade-ca"),
    ("Role", "palisade-ca"),
    ("RoleBinding", "palisade-ca"),
    ("Deployment", "palisade-ca"),
    ("Deployment", "palisade-injector"),
    ("Service", "palisade-ca"),
    ("Service", "palisade-injector"),
    ("MutatingWebhookConfiguration", "palisade-injector"),
    ("NetworkPolicy", "palisade-ca"),
    ("NetworkPolicy", "palisade-injector"),
}


def kinds_and_names(rendered):
    return {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}


def test_newest_schema_is_newer_than_the_minimum():
    # Guards the parametrisation: two distinct Kubernetes versions are checked.
    assert KUBE_NEWEST.split(".")[:2] != KUBE_MIN.split(".")[:2]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_value_set_renders_the_control_plane(name):
    rendered = render(name)
    present = kinds_and_names(rendered)
    missing = CONTROL_PLANE - present
    assert not missing, f"{name}: not rendered: {sorted(missing)}"
    ns = rendered.value_set.namespace
    for obj in rendered.objects:
        if obj["kind"] in {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}:
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            assert obj["metadata"].get("namespace") == ns, (obj["kind"], obj["metadata"]["name"])
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered.objects]
    assert len(names) == len(set(names)), f"{name}: duplicate objects"


def test_default_render_has_pdbs_and_two_replicas():
    rendered = render("default")
    for name in ("palisade-ca", "palisade-injector"):
        assert rendered.one("Deployment", name)["spec"]["replicas"] == 2
        pdb = rendered.one("PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert (
            pdb["spec"]["selector"]["matchLabels"]
            == rendered.one("Deployment", name)["spec"]["selector"]["matchLabels"]
        )
        spread = rendered.one("Deployment", name)["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_ha_off_drops_the_pdbs():
    # A PodDisruptionBudget over a single replica would block every node drain.
    rendered = render("ha-off")
    assert rendered.of_kind("PodDisruptionBudget") == []
    assert rendered.one("Deployment", "palisade-ca")["spec"]["replicas"] == 1


def test_service_monitors_only_when_the_api_is_served():
    assert {o["metadata"]["name"] for o in render("monitoring-on").of_kind("ServiceMonitor")} == {
        "palisade-ca",
        "palisade-injector",
    }
    for sm in render("monitoring-on").of_kind("ServiceMonitor"):
        assert sm["metadata"]["labels"]["release"] == "prom"
        assert sm["spec"]["endpoints"] == [
            {"port": "http-admin", "path": "/metrics", "scheme": "http", "interval": "30s"}
        ]
    # Enabled, but the cluster has no Prometheus Operator: nothing rendered, NOTES warn.
    values = VALUE_SETS["monitoring-on"].values
    release = install_dry_run(values)
    assert "kind: ServiceMonitor" not in release["manifest"]
    assert "no ServiceMonitor was created" in release["notes"]
    for name in VALUE_SETS:
        if name != "monitoring-on":
            assert render(name).of_kind("ServiceMonitor") == []


def test_notes_tell_how_to_opt_in_and_verify():
    notes = render("custom-namespace-trust-domain").notes
    assert "kubectl label namespace <NAMESPACE> palisade.dev/inject=enabled" in notes
    assert "-l palisade.dev/injected=true" in notes
    assert "/identity" in notes
    assert "spiffe://prod.example.org/ns/<NAMESPACE>/sa/<SERVICE-ACCOUNT>" in notes
    assert "kube-system, mesh-control, legacy, batch" in notes


def test_notes_explain_the_injectors_wait_only_when_the_ca_issues_its_certificate():
    wait = "until palisade-ca has written their serving"
    assert wait in render("default").notes
    assert wait not in render("chart-cert").notes and wait not in render("cert-manager").notes


def _validate(obj, version):
    # Strict: unknown fields are errors, as `kubectl apply --validate=strict` makes them.
    return kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_strictly(name, version):
    rendered = render(name)
    unchecked = set()
    for obj in rendered.objects:
        try:
            _validate(obj, version)
        except SchemaNotFoundError:
            unchecked.add(obj["kind"])
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {path}: {e.message}")
    # Only custom resources may lack a schema, and only the ones this value set asks for.
    assert unchecked == set(rendered.value_set.custom_kinds)


def test_strict_validation_catches_a_mistyped_field():
    # The check above can fail: a misspelt field in a rendered object is rejected.
    deployment = dict(render("default").one("Deployment", "palisade-ca"))
    deployment["spec"] = dict(deployment["spec"], replica=2)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment, KUBE_MIN)


def test_crd_file_is_present():
    # Fails (does not skip) until charts/palisade/crds/ ships the MeshPolicy CRD.
    docs = crd_documents()
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("CustomResourceDefinition", "meshpolicies.palisade.dev")
    ]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_validates_strictly(version):
    for doc in crd_documents():
        _validate(doc, version)


def test_kubernetes_validate_cli_strict(tmp_path):
    # The same check through the command line the issue names, over every file at once.
    import subprocess
    import sys
    from pathlib import Path

    from chart_support import write_manifests

    folders = write_manifests(tmp_path)
    files = sorted(str(p) for folder in folders.values() for p in Path(folder).glob("*.yaml"))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    for version in KUBE_VERSIONS:
        proc = subprocess.run([str(cli), "--strict", "--quiet", "-k", version, *files],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ERROR" not in proc.stdout
        # Only the custom resources have no schema to check against.
        warned = {line.split("kind ")[1].split(" ")[0] for line in proc.stdout.splitlines() if line.startswith("WARN")}
        assert warned == {"ServiceMonitor", "Certificate", "Issuer"}, proc.stdout


def test_helm_lint_strict():
    import helm_python

    def problems(values, namespace):
        report = helm_python.lint(str(CHART_DIR), values, strict=True, namespace=namespace, kube_version=KUBE_MIN)
        return report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]

    for vs in VALUE_SETS.values():
        assert problems(vs.values, vs.namespace) == [], vs.name
    assert problems({"ca": {"replicas": "two"}}, "palisade-system") != []


def test_duplicate_keys_are_caught():
    # The loader every test reads the manifests with refuses what PyYAML would silently merge.
    from chart_support import load_all

    with pytest.raises(Exception, match="duplicate key"):
        load_all("metadata:\n  labels:\n    a: x\n    a: y\n")


@pytest.mark.parametrize("kube_version", ["1.29.0", KUBE_NEWEST])
def test_installs_on_every_supported_kubernetes(kube_version):
    release = install_dry_run({}, kube_version=kube_version)
    assert "kind: MutatingWebhookConfiguration" in release["manifest"]


def test_kubernetes_1_28_needs_classic_sidecars():
    import helm_python

    # Native sidecars are off by default before 1.29: refuse rather than inject broken pods.
    with pytest.raises(helm_python.HelmError, match="injector.nativeSidecar=false"):
        install_dry_run({}, kube_version="1.28.5")
    release = install_dry_run({"injector": {"nativeSidecar": False}}, kube_version="1.28.5")
    assert "kind: MutatingWebhookConfiguration" in release["manifest"]


def test_refuses_kubernetes_older_than_1_28():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="kubeVersion|Kubernetes version"):
        install_dry_run({}, kube_version="1.27.9")
