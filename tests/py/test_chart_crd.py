"""The MeshPolicy CRD in charts/palisade/crds/: its names and columns, a structural schema the
API server accepts, and an admission of sample MeshPolicies that applies the schema and its CEL
rules (with cel-python) the way the API server would. Missing CRD file = failure, never a skip.

Issue 5 will generate this CRD from the Rust type and add a test that the two are equal; the
samples here then pin the generated schema's behaviour too."""

from __future__ import annotations

import copy

import celpy
import jsonschema
import pytest

from chart_support import crd_documents

SCHEMA_KEYS_IGNORED_BY_JSONSCHEMA = ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-map-type")


@pytest.fixture(scope="module")
def crd():
    (doc,) = crd_documents()
    return doc


@pytest.fixture(scope="module")
def version(crd):
    (v,) = crd["spec"]["versions"]
    return v


def test_names_scope_and_version(crd, version):
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "meshpolicies.palisade.dev"
    assert spec["group"] == "palisade.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "MeshPolicy"
    assert spec["names"]["plural"] == "meshpolicies"
    assert spec["names"]["singular"] == "meshpolicy"
    assert version["name"] == "v1alpha1" and version["served"] is True and version["storage"] is True
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Mode"]["jsonPath"] == ".spec.mode"
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def structural_errors(node, path="schema"):
    """The parts of Kubernetes' structural-schema rules that a hand-written schema can break:
    every node has a type (or says it is int-or-string / preserves unknown fields), `properties`
    and `additionalProperties` are not mixed, and `items` is a single schema."""
    errors = []
    if not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
        if "type" not in node:
            errors.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: properties and additionalProperties together")
    for key in ("oneOf", "anyOf", "allOf", "not"):
        if key in node:
            errors.append(f"{path}: {key} (keep value validation in CEL rules)")
    for name, child in node.get("properties", {}).items():
        errors += structural_errors(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        if not isinstance(node["items"], dict):
            errors.append(f"{path}: items must be one schema")
        else:
            errors += structural_errors(node["items"], f"{path}[]")
    return errors


def test_schema_is_structural(version):
    schema = version["schema"]["openAPIV3Schema"]
    assert structural_errors(schema) == []
    assert structural_errors({"type": "object", "properties": {"a": {}}}) == ["schema.a: no type"]


def with_closed_objects(schema):
    """For jsonschema: unknown fields are errors (kubectl's default strict field validation)."""
    schema = copy.deepcopy(schema)

    def close(node):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            close(child)
        if isinstance(node.get("items"), dict):
            close(node["items"])

    close(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


CEL = celpy.Environment()


def cel_errors(schema, value, path="", env=CEL):
    """Evaluate every x-kubernetes-validations rule against the value it sits on."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                errors += cel_errors(child, value[name], f"{path}.{name}", env)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]", env)
    return errors


def admit(version, spec):
    """[] when the API server would admit a MeshPolicy with this spec, else the reasons."""
    schema = version["schema"]["openAPIV3Schema"]
    obj = {"apiVersion": "palisade.dev/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "p", "namespace": "shop"}, "spec": spec}
    validator = jsonschema.Draft7Validator(with_closed_objects(schema))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    if not errors:
        errors = cel_errors(schema, obj)
    return errors


VALID = {
    "design example": {
        "targetSelector": {"matchLabels": {"app": "api"}},
        "ports": [8080],
        "allow": [{"serviceAccounts": ["shop/web"]}, {"namespaces": ["monitoring"]}],
    },
    "every rule kind, audit": {
        "mode": "audit",
        "allow": [
            {"serviceAccounts": ["shop/*", "batch/report-job.v2"]},
            {"namespaces": ["a", "b-2"]},
            {"authenticated": True},
            {"unauthenticated": True},
        ],
    },
    "selector expressions": {
        "targetSelector": {
            "matchExpressions": [
                {"key": "app.kubernetes.io/name", "operator": "In", "values": ["api", "web"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ]
        },
        "ports": [1, 65535],
    },
    "empty: every pod, every port, nothing allowed": {},
}

INVALID = {
    "rule with two kinds": {"allow": [{"namespaces": ["a"], "authenticated": True}]},
    "rule with no kind": {"allow": [{}]},
    "authenticated false": {"allow": [{"authenticated": False}]},
    "service account without namespace": {"allow": [{"serviceAccounts": ["web"]}]},
    "service account wildcard namespace": {"allow": [{"serviceAccounts": ["*/web"]}]},
    "empty service account list": {"allow": [{"serviceAccounts": []}]},
    "namespace not a DNS label": {"allow": [{"namespaces": ["Shop"]}]},
    "port 0": {"ports": [0]},
    "port above 65535": {"ports": [65536]},
    "port as a string": {"ports": ["8080"]},
    "unknown mode": {"mode": "permissive"},
    "In without values": {"targetSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
    "Exists with values": {"targetSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}},
    "unknown operator": {"targetSelector": {"matchExpressions": [{"key": "app", "operator": "Like", "values": ["x"]}]}},
    "unknown field": {"allow": [{"identities": ["x"]}]},
    "label value not a string": {"targetSelector": {"matchLabels": {"app": 1}}},
}


@pytest.mark.parametrize("spec", VALID.values(), ids=VALID.keys())
def test_admits(version, spec):
    assert admit(version, spec) == []


@pytest.mark.parametrize("spec", INVALID.values(), ids=INVALID.keys())
def test_rejects(version, spec):
    assert admit(version, spec) != []


def test_mode_defaults_to_enforce(version):
    mode = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["mode"]
    assert mode["default"] == "enforce"
    assert mode["enum"] == ["enforce", "audit"]
