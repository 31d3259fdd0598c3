"""values.yaml documents every value, and values.schema.json (enforced by Helm itself on install
and upgrade) rejects unknown and mistyped values."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from chart_support import CHART_DIR, VALUE_SETS, install_dry_run, validate_values

VALUES_FILE = CHART_DIR / "values.yaml"
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z][A-Za-z0-9_.-]*):(?P<rest>.*)$")


def helm_errors():
    import helm_python

    return helm_python.HelmValuesError, helm_python.HelmError


def test_schema_is_valid_draft7():
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_defaults_and_every_value_set_pass():
    defaults = yaml.safe_load(VALUES_FILE.read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(defaults)
    validate_values({})
    for vs in VALUE_SETS.values():
        validate_values(vs.values)


WRONG = {
    "unknown top-level value": {"replicaCount": 3},
    "unknown nested value": {"ca": {"replica": 2}},
    "replicas as a string": {"ca": {"replicas": "two"}},
    "replicas of zero": {"injector": {"replicas": 0}},
    "unknown default policy": {"defaultPolicy": "allow-all"},
    "nativeSidecar as a string": {"injector": {"nativeSidecar": "yes"}},
    "ipFamilies with an unknown family": {"injector": {"ipFamilies": ["IPv4", "IPv5"]}},
    "ipFamilies empty": {"injector": {"ipFamilies": []}},
    "trust domain with bad characters": {"trustDomain": "Prod_Domain!"},
    "webhook timeout above 30s": {"injector": {"webhook": {"timeoutSeconds": 60}}},
    "unknown webhook cert issuer": {"injector": {"webhook": {"certIssuer": "cert-manager"}}},
    "webhook cert issuer empty": {"injector": {"webhook": {"certIssuer": ""}}},
    "API server CIDR that is a hostname": {"networkPolicy": {"apiServerCIDRs": ["kubernetes.default"]}},
    "API server CIDR without a prefix": {"networkPolicy": {"apiServerCIDRs": ["172.18.0.1"]}},
    "unknown pull policy": {"ca": {"image": {"pullPolicy": "Sometimes"}}},
    "a value the chart no longer has": {"proxy": {"initImage": {"repository": "x"}}},
    "digest that is not sha256": {"ca": {"image": {"digest": "latest"}}},
    "cert TTL without a unit": {"ca": {"certTTL": "3600"}},
    "excluded namespace not a DNS label": {"injector": {"excludeNamespaces": ["Not A Namespace"]}},
    "log format": {"log": {"format": "xml"}},
    "resources with an unknown key": {"proxy": {"resources": {"requests": {"cpu": "10m", "memory": "32Mi", "gpu": 1}}}},
    "monitoring enabled as a string": {"monitoring": {"serviceMonitor": {"enabled": "true"}}},
}


@pytest.mark.parametrize("values", WRONG.values(), ids=WRONG.keys())
def test_schema_rejects(values):
    values_error, _ = helm_errors()
    with pytest.raises(values_error):
        validate_values(values)


def test_install_refuses_a_wrong_value():
    # Not only the validator: a dry-run install (what `helm install` does) stops on it too.
    _, helm_error = helm_errors()
    with pytest.raises(helm_error, match="replicas"):
        install_dry_run({"ca": {"replicas": "two"}})


def leaf_paths(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def schema_paths(schema, prefix=()):
    props = schema.get("properties")
    if schema.get("type") == "object" and props:
        for k, v in props.items():
            yield from schema_paths(v, prefix + (k,))
    else:
        yield prefix


def test_schema_and_values_yaml_list_the_same_values():
    defaults = yaml.safe_load(VALUES_FILE.read_text())
    assert set(leaf_paths(defaults)) == set(schema_paths(SCHEMA))


def test_every_value_is_commented():
    lines = VALUES_FILE.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = KEY_LINE.match(line)
        if not m:
            continue
        if "#" in m["rest"]:
            continue  # documented on its own line
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        above = lines[j] if j >= 0 else ""
        if above.strip().startswith("#") and len(above) - len(above.lstrip()) == len(m["indent"]):
            continue
        undocumented.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert undocumented == [], "values without a comment:\n" + "\n".join(undocumented)
