"""palisade-injector end to end: real pod specs (kubectl's pod templates and hand-written pods)
are sent as AdmissionReviews to a running `palisade-injector serve` over HTTPS; the returned
patch is applied with `jsonpatch` (an RFC 6902 implementation independent of ours), the mutated
Pod is validated strictly against Kubernetes' own schema, and its containers, volumes, security
contexts and probe rewrites are compared with what docs/injector.md promises. Feeding the
mutated pod back must yield no patch."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest

from test_injector_support import (  # noqa: F401  (fixtures are used by name)
    admission_review,
    apply_patch,
    classic_injector,
    env_of,
    hand_written_pods,
    inject_and_check,
    injector,
    kubectl_fixtures,
    pod_from_template,
    tls_files,
)


@pytest.mark.parametrize("name", sorted(kubectl_fixtures()))
def test_kubectl_pod_templates_are_injected_and_validate(injector, name):
    pod = pod_from_template(kubectl_fixtures()[name], name)
    inject_and_check(injector, pod, f"kubectl pod template {name!r}")


@pytest.mark.parametrize("name", sorted(hand_written_pods()))
def test_hand_written_pods_are_injected_and_validate(injector, name):
    inject_and_check(injector, hand_written_pods()[name], f"pod {name!r}")


@pytest.mark.parametrize("name", ["init-and-sidecars", "probes", "bare"])
def test_classic_sidecar_mode(classic_injector, name):
    inject_and_check(classic_injector, hand_written_pods()[name], f"pod {name!r} (classic)", native=False)


def test_kubectl_templates_match_what_kubectl_prints():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the committed templates were not re-checked against kubectl")
    for name, fixture in kubectl_fixtures().items():
        printed = subprocess.run([kubectl, *fixture["argv"][1:]], check=True, capture_output=True, text=True)
        assert json.loads(printed.stdout)["spec"]["template"] == fixture["template"], (
            f"{name}: kubectl now prints a different pod template; regenerate "
            f"tests/py/fixtures/injector/kubectl/{name}.json with {' '.join(fixture['argv'])}")


def test_annotations_reach_palisade_init_and_the_proxy(injector):
    pod = hand_written_pods()["all-annotations"]
    response = injector.review(admission_review(copy.deepcopy(pod)))
    mutated, _ = apply_patch(copy.deepcopy(pod), response)
    init, proxy = mutated["spec"]["initContainers"][:2]
    assert init["command"] == [
        "palisade-proxy", "init", "--proxy-uid", "1337", "--inbound-port", "15006",
        "--outbound-port", "15001", "--skip-inbound-ports", "22,2222,15021",
        "--skip-outbound-ports", "5432,6379", "--skip-outbound-cidrs", "169.254.169.254/32,10.0.0.0/8",
    ]
    for c in (init, proxy):
        assert c["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
    assert env_of(proxy)["PALISADE_LOG"] == "info,palisade_proxy=debug"


def test_defaults_without_annotations(injector):
    pod = hand_written_pods()["bare"]
    mutated, _ = apply_patch(copy.deepcopy(pod), injector.review(admission_review(copy.deepcopy(pod))))
    init, proxy = mutated["spec"]["initContainers"]
    assert init["command"] == [
        "palisade-proxy", "init", "--proxy-uid", "1337", "--inbound-port", "15006",
        "--outbound-port", "15001", "--skip-inbound-ports", "15021",
    ]
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    assert env_of(proxy)["PALISADE_LOG"] == "info"
    assert mutated["metadata"]["labels"] == {"palisade.dev/injected": "true"}


def test_patch_escapes_odd_keys(injector):
    pod = hand_written_pods()["odd-keys"]
    _, ops = apply_patch(copy.deepcopy(pod), injector.review(admission_review(copy.deepcopy(pod))))
    paths = {op["path"] for op in ops}
    assert "/metadata/labels/palisade.dev~1injected" in paths
    assert "/metadata/annotations/palisade.dev~1app-probes" in paths
