"""palisade-injector's decisions over HTTPS: pods and requests it must leave alone, annotations
it must refuse with a message naming them, malformed reviews (HTTP 400), oversized ones (413),
and the admin port's counters."""

from __future__ import annotations

import copy
import json
import socket
import ssl
import subprocess

import pytest

from test_injector_support import (  # noqa: F401  (fixtures are used by name)
    admission_review,
    apply_patch,
    bare_pod_with,
    injector,
    injector_binary,
    tls_files,
)


SKIPS = {
    "host_network": (admission_review(bare_pod_with(spec__hostNetwork=True)), "host_network"),
    "label_opt_out": (admission_review(bare_pod_with(metadata__labels={"palisade.dev/inject": "disabled"})), "opted_out"),
    "annotation_opt_out": (
        admission_review(bare_pod_with(metadata__annotations={"palisade.dev/inject": "disabled"})), "opted_out"),
    "labelled_injected": (
        admission_review(bare_pod_with(metadata__labels={"palisade.dev/injected": "true"})), "already_injected"),
    "proxy_present": (
        admission_review(bare_pod_with(spec__containers=[{"name": "palisade-proxy", "image": "p"}])), "already_injected"),
    "update": (admission_review(bare_pod_with(), operation="UPDATE"), "not_create"),
    "delete": (admission_review(None, operation="DELETE"), "not_create"),
    "deployment": (admission_review({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
                                    kind={"group": "apps", "version": "v1", "kind": "Deployment"}), "not_pod"),
}


@pytest.mark.parametrize("case", sorted(SKIPS))
def test_skipped_requests_are_allowed_without_a_patch(injector, case):
    review, reason = SKIPS[case]
    response = injector.review(copy.deepcopy(review))
    assert response["allowed"] is True
    assert "patch" not in response and "patchType" not in response
    assert response["auditAnnotations"]["decision"] == f"skipped: {reason}"


DENIALS = [
    ("palisade.dev/skip-inbound-ports", "http", "comma-separated port numbers"),
    ("palisade.dev/skip-outbound-ports", "70000", "comma-separated port numbers"),
    ("palisade.dev/skip-outbound-cidrs", "10.0.0.0/33", "comma-separated CIDRs of either family"),
    ("palisade.dev/skip-outbound-cidrs", "fd00::/129", "prefix length outside 0-128"),
    ("palisade.dev/proxy-cpu-request", "fast", "Kubernetes CPU quantity"),
    ("palisade.dev/proxy-memory-limit", "1GB", "Kubernetes memory quantity"),
    ("palisade.dev/proxy-memory-limit", "16Mi", "no smaller than"),
    ("palisade.dev/log-level", "loud", "a level (trace, debug, info, warn, error, off)"),
    ("palisade.dev/inject", "false", "\"enabled\" or \"disabled\""),
]


@pytest.mark.parametrize("annotation,value,form", DENIALS)
def test_invalid_annotation_denies_the_pod_naming_it(injector, annotation, value, form):
    response = injector.review(admission_review(bare_pod_with(metadata__annotations={annotation: value})))
    assert response["allowed"] is False
    assert "patch" not in response
    message = response["status"]["message"]
    assert annotation in message and repr(value).strip("'") in message, message
    assert form in message, message
    assert response["status"]["code"] == 400


def test_named_probe_port_that_does_not_exist_is_denied(injector):
    pod = bare_pod_with(spec__containers=[{"name": "app", "image": "a", "livenessProbe": {"tcpSocket": {"port": "nope"}}}])
    response = injector.review(admission_review(pod))
    assert response["allowed"] is False
    assert "container \"app\" livenessProbe uses port \"nope\"" in response["status"]["message"]


MALFORMED = {
    "not_json": (b"{\"apiVersion\": ", "not a JSON AdmissionReview"),
    "wrong_api_version": (json.dumps({**admission_review(bare_pod_with()), "apiVersion": "admission.k8s.io/v1beta1"}).encode(),
                          "admissionReviewVersions"),
    "wrong_kind": (json.dumps({**admission_review(bare_pod_with()), "kind": "Pod"}).encode(), "must be an \"AdmissionReview\""),
    "missing_uid": (json.dumps({**admission_review(bare_pod_with()), "request": {
        k: v for k, v in admission_review(bare_pod_with())["request"].items() if k != "uid"}}).encode(), "request.uid"),
    "missing_request": (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
                        "has no request"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_reviews_get_http_400_with_a_clear_message(injector, case):
    body, needle = MALFORMED[case]
    status, answer = injector.post(body)
    assert status == 400, answer
    error = json.loads(answer)["error"]
    assert error["code"] == case
    assert needle in error["message"], error["message"]


def test_oversized_review_gets_http_413_before_the_body_is_read(injector, tls_files):
    # The answer comes from the declared length alone: send the headers of a 5 MiB review and
    # a first slice of it, then read; a webhook that waited for the whole body would time out.
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    with socket.create_connection(("127.0.0.1", int(injector.webhook[1])), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 5242880\r\n\r\n" + b"{" + b" " * 4096)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert "--max-request-bytes" in json.loads(body)["error"]["message"]


def test_admin_port_reports_ready_live_and_counts(injector):
    # One review of each kind, so that the counters below have moved whatever ran before.
    injector.review(admission_review(bare_pod_with()))
    injector.review(admission_review(bare_pod_with(spec__hostNetwork=True)))
    injector.review(admission_review(bare_pod_with(metadata__annotations={"palisade.dev/log-level": "x"})))
    injector.post(b"nope")
    assert injector.admin_get("/ready")[0] == 200
    assert injector.admin_get("/live")[0] == 200
    status, metrics = injector.admin_get("/metrics")
    assert status == 200
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("palisade_injector_reviews_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = int(value)
    for labels in ['{result="injected",reason="injected"}', '{result="skipped",reason="host_network"}',
                   '{result="denied",reason="invalid_annotation"}', '{result="rejected",reason="not_json"}']:
        assert counts.get("palisade_injector_reviews_total" + labels, 0) >= 1, (labels, metrics)
    assert "palisade_injector_patch_build_seconds_count" in metrics


# Values that palisade-init and the injector once disagreed about (the injector admitted IPv6
# ranges that init refused, so the pod never started), and their neighbours.
CIDR_VALUES = ["10.0.0.0/8", "169.254.169.254", " 10.1.0.0/16 , 192.168.0.0/16", "fd00::/8",
               "10.0.0.0/8,fd00::/8", "::1", "fd00::/129", "fe80::1%eth0", "10.0.0.0/33", "example.com/8"]


@pytest.mark.parametrize("value", CIDR_VALUES)
def test_palisade_init_accepts_exactly_the_cidrs_the_injector_admits(injector, value):
    """A pod the injector admits must get past palisade-init, and a value init would refuse must
    be refused at admission, where the user sees the message (not in a crash-looping pod)."""
    pod = bare_pod_with(metadata__annotations={"palisade.dev/skip-outbound-cidrs": value})
    response = injector.review(admission_review(copy.deepcopy(pod)))
    proxy = injector_binary().parent / "palisade-proxy"
    if response["allowed"]:
        mutated, _ = apply_patch(copy.deepcopy(pod), response)
        (init,) = [c for c in mutated["spec"]["initContainers"] if c["name"] == "palisade-init"]
        args = init["command"][1:]
    else:
        assert "palisade.dev/skip-outbound-cidrs" in response["status"]["message"]
        args = ["init", "--skip-outbound-cidrs", value]
    ran = subprocess.run([str(proxy), *args, "--dry-run"], capture_output=True, text=True, timeout=30)
    assert (ran.returncode == 0) == response["allowed"], (
        f"injector {'admitted' if response['allowed'] else 'refused'} {value!r}, "
        f"palisade-init exited {ran.returncode}: {ran.stderr.strip()}")
