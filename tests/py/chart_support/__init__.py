"""Renders charts/palisade with Helm's own engine, offline, for the chart tests.

Helm comes from PyPI `helm-python-sdk` (import name `helm_python`): its wheel bundles
libhelm_c, a C ABI over Helm v4's Go SDK, so nothing is downloaded at run time and no helm
binary or cluster is needed. A release is rendered the way `helm install --dry-run=client`
(= `helm template`) does it: values are checked against values.schema.json, templates are
rendered in Helm's install order, NOTES.txt is rendered, `lookup` returns nothing.

`Config.install` in the Python wrapper does not expose `api_versions`/`kube_version`, which the
native ABI accepts (`helm template --api-versions/--kube-version`); we call the native entry
point with them so a value set can model a cluster that serves monitoring.coreos.com/v1. The
package is pinned in scripts/requirements-test.txt, so this private call cannot drift.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART_DIR = REPO / "charts" / "palisade"
CRD_FILE = CHART_DIR / "crds" / "meshpolicies.palisade.dev.yaml"
DOCKERFILE = REPO / "Dockerfile"

RELEASE = "palisade"
DEFAULT_NAMESPACE = "palisade-system"
# The oldest Kubernetes the chart is validated against (the chart's kubeVersion allows 1.28,
# which is rendered but has no schema check of its own).
KUBE_MIN = "1.29.0"


@dataclass(frozen=True)
class ValueSet:
    name: str
    values: dict[str, Any]
    namespace: str = DEFAULT_NAMESPACE
    # API groups/versions (and group/version/Kind) the modelled cluster serves beyond the
    # built-in ones, as `helm template --api-versions`.
    api_versions: tuple[str, ...] = ()
    # Custom resources (kind) this value set renders: no built-in schema exists for them.
    custom_kinds: frozenset[str] = field(default_factory=frozenset)


# injector.webhook.certIssuer "chart": Helm generates the webhook's serving certificate and its
# caBundle (the default, "palisade-ca", leaves both to the CA at run time).
CHART_CERT = {"injector": {"webhook": {"certIssuer": "chart"}}}

VALUE_SETS: dict[str, ValueSet] = {
    v.name: v
    for v in [
        ValueSet("default", {}),
        ValueSet("chart-cert", CHART_CERT),
        ValueSet("ha-off", {"ca": {"replicas": 1}, "injector": {"replicas": 1}}),
        ValueSet("native-sidecar-off", {"injector": {"nativeSidecar": False}}),
        ValueSet(
            "custom-namespace-trust-domain",
            {
                "trustDomain": "prod.example.org",
                "defaultPolicy": "deny",
                "ca": {"certTTL": "30m", "externalCA": {"secretName": "corp-intermediate", "type": "intermediate"}},
                "injector": {"excludeNamespaces": ["legacy", "batch"]},
                "log": {"level": "debug", "format": "plain"},
            },
            namespace="mesh-control",
        ),
        ValueSet(
            "monitoring-on",
            {"monitoring": {"namespace": "observability", "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
            api_versions=("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor"),
            custom_kinds=frozenset({"ServiceMonitor"}),
        ),
        ValueSet(
            "cert-manager",
            {"injector": {"webhook": {"certManager": {"enabled": True}}}},
            api_versions=("cert-manager.io/v1",),
            custom_kinds=frozenset({"Certificate", "Issuer"}),
        ),
        ValueSet(
            "pinned-digests",
            {
                "image": {"registry": "registry.example.com:5000/mirror", "pullSecrets": ["mirror-creds"]},
                "ca": {
                    "image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
                    "externalCA": {"secretName": "corp-root", "type": "root"},
                },
                "injector": {"image": {"digest": "sha256:" + "b" * 64, "pullPolicy": "Always"}},
                "proxy": {"image": {"tag": "0.1.1"}, "resources": {"limits": {"cpu": "2"}}, "log": {"level": "debug"}},
                "networkPolicy": {"enabled": True, "apiServerCIDRs": ["172.18.0.0/24", "fd00:18::/64"]},
            },
        ),
    ]
}


class StrictLoader(yaml.SafeLoader):
    """YAML as the API machinery reads it: a key given twice in one mapping is an error
    (PyYAML would silently keep the last one)."""


def _no_duplicate_keys(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


@dataclass(frozen=True)
class Rendered:
    value_set: ValueSet
    manifest: str  # the ordered multi-document manifest, as `helm template` prints it
    notes: str

    @functools.cached_property
    def objects(self) -> list[dict[str, Any]]:
        return load_all(self.manifest)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
        return found[0]


def _helm():
    import helm_python

    return helm_python


def install_dry_run(
    values: dict[str, Any],
    namespace: str = DEFAULT_NAMESPACE,
    api_versions: tuple[str, ...] = (),
    kube_version: str = KUBE_MIN,
) -> dict[str, Any]:
    """A client-side dry-run install; returns the release (manifest, notes, ...)."""
    helm = _helm()
    from helm_python import _native

    options = {"dry_run": "client", "namespace": namespace, "kube_version": kube_version}
    if api_versions:
        options["api_versions"] = list(api_versions)
    # storage "memory": a dry run stores nothing anyway, and no kubeconfig is read for it.
    with helm.Config(namespace=namespace, storage_driver="memory") as cfg:
        payload = _native.call_string(
            "helm_install",
            cfg._raw(),
            cfg._context_arg(None),
            _native.HANDLE(0),
            os.fspath(CHART_DIR),
            RELEASE,
            json.dumps(values),
            json.dumps(options),
        )
    return json.loads(payload)


@functools.lru_cache(maxsize=None)
def render(name: str) -> Rendered:
    vs = VALUE_SETS[name]
    release = install_dry_run(vs.values, vs.namespace, vs.api_versions)
    return Rendered(vs, release["manifest"], release.get("notes", ""))


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """base with extra laid over it, mappings merged key by key (as Helm merges --set)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def cert_issuer(vs: ValueSet) -> str:
    """Who issues the webhook's serving certificate in this value set: palisade-ca, chart or
    cert-manager (which wins over certIssuer)."""
    webhook = vs.values.get("injector", {}).get("webhook", {})
    if webhook.get("certManager", {}).get("enabled"):
        return "cert-manager"
    return webhook.get("certIssuer", "palisade-ca")


@functools.lru_cache(maxsize=None)
def render_chart_cert(name: str) -> Rendered:
    """The value set `name` with certIssuer "chart": the same release, with the serving
    certificate and caBundle rendered, for the tests that need the certificate itself."""
    base = VALUE_SETS[name]
    vs = ValueSet(f"{name}+chart-cert", merged(base.values, CHART_CERT), base.namespace, base.api_versions,
                  base.custom_kinds)
    release = install_dry_run(vs.values, vs.namespace, vs.api_versions)
    return Rendered(vs, release["manifest"], release.get("notes", ""))


# Flags of a command line the chart renders that take no value.
SWITCHES = frozenset({"--manage-injector-tls"})


def command_line(args: list[str]) -> tuple[str, dict[str, Any]]:
    """['serve', '--a', 'x', '--switch', '--b', 'y'] -> ('serve', {'--a': 'x', '--switch': True,
    '--b': 'y'}); every other token must be a flag followed by its value, each flag once."""
    sub, rest, flags = args[0], list(args[1:]), {}
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--") and flag not in flags, args
        if flag in SWITCHES:
            flags[flag] = True
        else:
            assert rest and not rest[0].startswith("--"), f"{flag} has no value: {args}"
            flags[flag] = rest.pop(0)
    return sub, flags


def validate_values(values: dict[str, Any]) -> None:
    """values.schema.json through Helm's own validator; raises helm_python.HelmValuesError."""
    helm = _helm()
    with helm.Chart.load(os.fspath(CHART_DIR)) as chart:
        chart.validate_schema(values)


def crd_documents() -> list[dict[str, Any]]:
    """The chart's CRDs as Helm loads them from crds/ (a missing file fails loudly)."""
    if not CRD_FILE.is_file():
        raise AssertionError(
            f"{CRD_FILE.relative_to(REPO)} is missing: the chart must ship the MeshPolicy CRD"
        )
    helm = _helm()
    with helm.Chart.load(os.fspath(CHART_DIR)) as chart:
        crds = chart.crds
    docs = []
    for crd in crds:
        docs.extend(load_all(crd["data"]))
    return docs


def write_manifests(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every value set's manifest (and the CRDs) as files under directory, one folder each."""
    out = {}
    for name in VALUE_SETS:
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.yaml").write_text(render(name).manifest)
        out[name] = folder
    crds = directory / "crds"
    crds.mkdir(parents=True, exist_ok=True)
    (crds / CRD_FILE.name).write_text(CRD_FILE.read_text())
    out["crds"] = crds
    return out


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))
