"""checkov's Kubernetes policies pass on every rendered value set and the CRD, and its Dockerfile
policies on the Dockerfile, with zero failed checks. A check may be skipped only in the chart
(an annotation) or the Dockerfile (a comment), with the reason.

checkov runs once, over one directory holding every value set's manifest in its own folder
(it takes ~10 s to start, so one run instead of one per value set). `--skip-download` keeps it
offline: it would otherwise ask its vendor's API for check metadata.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import shutil

from chart_support import DOCKERFILE, VALUE_SETS, cert_issuer, write_manifests

CHECKOV = pathlib.Path(sys.executable).with_name("checkov")
# Every skip the chart asks for, and why: the value set decides whether it is needed.
EXPECTED_SKIPS = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_38", "CKV_K8S_155"}


def run_checkov(directory: pathlib.Path, frameworks=("kubernetes",)) -> dict[str, dict]:
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false", LOG_LEVEL="ERROR")
    proc = subprocess.run(
        [os.fspath(CHECKOV), "--framework", *frameworks, "-d", os.fspath(directory),
         "--skip-download", "--output", "json", "--soft-fail"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"checkov exited {proc.returncode}: {proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    by_type = {r.get("check_type"): r for r in reports}
    assert set(by_type) == set(frameworks), f"checkov reported {sorted(by_type)}"
    return by_type


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rendered")
    write_manifests(root)
    (root / "dockerfile").mkdir()
    shutil.copy(DOCKERFILE, root / "dockerfile" / "Dockerfile")
    return run_checkov(root, ("kubernetes", "dockerfile"))


@pytest.fixture(scope="module")
def checkov_report(reports):
    return reports["kubernetes"]


def test_dockerfile_passes(reports):
    report = reports["dockerfile"]
    failed = [f"{r['check_id']} {r['check_name']}" for r in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 20
    skipped = report["results"]["skipped_checks"]
    assert [r["check_id"] for r in skipped] == ["CKV_DOCKER_2"]
    assert "HEALTHCHECK" in skipped[0]["check_result"]["suppress_comment"]


def folder_of(result) -> str:
    return result["file_path"].strip("/").split("/")[0]


def test_zero_failed_checks(checkov_report):
    failed = [
        f"{folder_of(r)}: {r['check_id']} {r['check_name']} on {r['resource']}"
        for r in checkov_report["results"]["failed_checks"]
    ]
    assert failed == [], "checkov failed:\n" + "\n".join(failed)
    assert checkov_report["summary"]["parsing_errors"] == 0


def test_every_value_set_and_the_crd_were_scanned(checkov_report):
    scanned = {folder_of(r) for r in checkov_report["results"]["passed_checks"]}
    # checkov has no policy for CustomResourceDefinitions: the CRD is parsed (counted as a
    # resource, no parsing error) but passes or fails nothing.
    assert scanned == set(VALUE_SETS)
    # 13+ control-plane objects in each value set, plus the CRD.
    assert checkov_report["summary"]["resource_count"] >= 13 * len(VALUE_SETS) + 1
    assert checkov_report["summary"]["passed"] > 1000


def test_skips_come_from_the_chart_with_a_reason(checkov_report):
    skipped = checkov_report["results"]["skipped_checks"]
    assert {r["check_id"] for r in skipped} == EXPECTED_SKIPS
    for r in skipped:
        reason = r["check_result"].get("suppress_comment") or ""
        assert len(reason) > 20, f"{r['check_id']} on {r['resource']} skipped without a reason"
        if r["check_id"] == "CKV_K8S_155":
            assert r["resource"] == "ClusterRole.default.palisade-ca", r["resource"]
        else:
            assert r["resource"].startswith("Deployment."), r["resource"]
    # Pinning digests with pullPolicy Always removes the need for those two skips.
    pinned = {r["check_id"] for r in skipped if folder_of(r) == "pinned-digests"}
    assert pinned == {"CKV_K8S_38", "CKV_K8S_155"}
    # The ClusterRole's update of the webhook configuration (CKV_K8S_155) exists, and is
    # skipped, only where the CA keeps the webhook's caBundle.
    webhook_skips = {folder_of(r) for r in skipped if r["check_id"] == "CKV_K8S_155"}
    assert webhook_skips == {n for n, vs in VALUE_SETS.items() if cert_issuer(vs) == "palisade-ca"}


def test_checkov_catches_a_privileged_container(tmp_path):
    # The scan can fail: a root, privileged container is reported.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: x}\n"
        "spec:\n  containers:\n  - name: c\n    image: busybox:1\n"
        "    securityContext: {privileged: true, runAsUser: 0}\n"
    )
    report = run_checkov(tmp_path)["kubernetes"]
    failed = {r["check_id"] for r in report["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= failed
