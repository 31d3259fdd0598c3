"""docs/install.md and docs/rbac.md say what the chart and the Dockerfile really do."""

from __future__ import annotations

import re

from chart_support import REPO, VALUE_SETS, render
from test_chart_images import RUNTIME_TARGETS, stages
from test_chart_security import CA_CLUSTER_ACCESS, CA_NAMESPACED_ACCESS, CA_SECRETS

INSTALL = (REPO / "docs" / "install.md").read_text()
RBAC = (REPO / "docs" / "rbac.md").read_text()


def section(text, heading):
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_environment_table_lists_what_the_chart_sets():
    documented = {}
    for row in section(INSTALL, "## Settings the chart passes by environment").splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in {"palisade-ca", "palisade-injector"}:
            for name in re.findall(r"`(PALISADE_[A-Z_]+)`", cells[1]):
                documented.setdefault(cells[0], set()).add(name)
    rendered = {}
    for name in VALUE_SETS:
        for d in render(name).of_kind("Deployment"):
            (c,) = d["spec"]["template"]["spec"]["containers"]
            rendered.setdefault(c["name"], set()).update(e["name"] for e in c.get("env", []))
    assert documented == rendered


def test_install_commands():
    assert "helm install palisade charts/palisade" in INSTALL
    assert "kubectl label namespace shop palisade.dev/inject=enabled" in INSTALL
    assert "-l palisade.dev/injected=true" in INSTALL
    assert "/identity" in INSTALL


def test_build_commands_name_the_dockerfile_targets():
    loop = re.search(r"for target in ([a-z -]+); do", INSTALL)
    assert loop, "docs/install.md shows how to build every image"
    assert set(loop[1].split()) == RUNTIME_TARGETS <= set(stages())


def test_rbac_doc_matches_the_chart():
    expected: dict = {}
    for table in (CA_CLUSTER_ACCESS, CA_NAMESPACED_ACCESS):
        for key, verbs in table.items():
            expected.setdefault(key, set()).update(verbs)
    resources = {resource for _, resource in expected}
    rows, secret_names = {}, set()
    # Only the CA's own tables: the operator's roles further down share resource names.
    for row in section(RBAC, "## palisade-ca").splitlines():
        cells = [c.strip().strip("`") for c in row.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1] in resources:
            group = "" if cells[0] == "core" else cells[0]
            # The Role's table has a resourceNames column before the verbs.
            verbs = cells[3] if len(cells) == 5 else cells[2]
            rows.setdefault((group, cells[1]), set()).update(v.strip() for v in verbs.split(","))
            if cells[1] == "secrets" and cells[2] != "—":
                secret_names.update(n.strip().strip("`") for n in cells[2].split(","))
    assert rows == expected
    # The Secrets the default chart lets the CA read and update by name.
    (by_name,) = [
        r for r in render("default").one("Role", "palisade-ca")["rules"] if "resourceNames" in r and r["resources"] == ["secrets"]
    ]
    assert secret_names == set(by_name["resourceNames"]) == set(CA_SECRETS["palisade-ca"])
