"""Helpers of the palisade-injector checks (test_injector_webhook.py, test_injector_decisions.py):
a running `palisade-injector serve` over HTTPS, AdmissionReviews built from real pod specs, and
the exact comparison of a mutated pod with what docs/injector.md promises. No tests here."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import queue
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "injector"
KUBE_NEWEST = kubernetes_validate.utils.latest_version()

PROXY_SECURITY_CONTEXT = {
    "runAsUser": 1337,
    "runAsGroup": 1337,
    "runAsNonRoot": True,
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
INIT_SECURITY_CONTEXT = {
    "runAsUser": 0,
    "runAsGroup": 0,
    "runAsNonRoot": False,
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": False,
    "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
VOLUMES = [
    {
        "name": "palisade-token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "palisade-ca",
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ]
        },
    },
    {
        "name": "palisade-trust-anchors",
        "configMap": {
            "name": "palisade-trust-anchors",
            "items": [{"key": "ca.pem", "path": "ca.pem"}],
        },
    },
    # What init did about capture (one line per family), for the proxy's /ready: memory only.
    {"name": "palisade-init-report", "emptyDir": {"medium": "Memory", "sizeLimit": "64Ki"}},
]
PROBE_KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
HANDLERS = ("httpGet", "tcpSocket", "grpc")


# ---------------------------------------------------------------- the running injector


def injector_binary() -> Path:
    bin_dir = Path(os.environ.get("PALISADE_BIN_DIR", ROOT / "target" / "debug"))
    path = bin_dir / "palisade-injector"
    if not path.is_file():
        pytest.fail(
            f"{path} does not exist: build it with `cargo build -p palisade-injector` "
            "or point PALISADE_BIN_DIR at the directory that holds it"
        )
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH: install it (apt-get install openssl) to mint the test certificate")
    d = tmp_path_factory.mktemp("injector-tls")
    cert, key = d / "tls.crt", d / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


class Injector:
    """A `palisade-injector serve` process on 127.0.0.1 with ports chosen by the kernel."""

    def __init__(self, tls_files, *extra: str):
        cert, key = tls_files
        self.logs: list[str] = []
        self.proc = subprocess.Popen(
            [str(injector_binary()), "serve", "--tls-cert", str(cert), "--tls-key", str(key),
             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json",
             "--log", "debug", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        # A thread drains stderr for the whole run (a full pipe would block the process) and
        # hands lines over, so that waiting for the address line can time out.
        lines: queue.Queue = queue.Queue()

        def drain():
            for line in self.proc.stderr:
                self.logs.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 20
        self.webhook = self.admin = None
        while self.webhook is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail("palisade-injector did not report its addresses within 20 s:\n"
                            + "".join(self.logs))
            if line is None:
                self.proc.wait(timeout=5)
                pytest.fail(f"palisade-injector exited ({self.proc.returncode}) before serving:\n"
                            + "".join(self.logs))
            try:
                fields = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "webhook_addr" in fields:
                self.webhook = fields["webhook_addr"].rsplit(":", 1)
                self.admin = fields["admin_addr"].rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(cert))
        self.conn = http.client.HTTPSConnection("localhost", int(self.webhook[1]), context=context, timeout=10)

    def post(self, body: bytes, path: str = "/mutate"):
        self.conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        return response.status, response.read()

    def review(self, review: dict) -> dict:
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, f"HTTP {status}: {body[:500]!r}"
        answer = json.loads(body)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == review["request"]["uid"]
        return answer["response"]

    def admin_get(self, path: str):
        conn = http.client.HTTPConnection("127.0.0.1", int(self.admin[1]), timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def injector(tls_files):
    inj = Injector(tls_files)
    yield inj
    inj.stop()


@pytest.fixture(scope="module")
def classic_injector(tls_files):
    inj = Injector(tls_files, "--native-sidecar", "false")
    yield inj
    inj.stop()


# ---------------------------------------------------------------- inputs


def kubectl_fixtures() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((FIXTURES / "kubectl").glob("*.json"))}


def pod_from_template(fixture: dict, name: str) -> dict:
    """The Pod the ReplicaSet controller creates from a Deployment's template."""
    template = copy.deepcopy(fixture["template"])
    metadata = template["metadata"]
    metadata["generateName"] = f"{name}-6b7f9c8d5-"
    metadata["namespace"] = fixture["namespace"] or "default"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def hand_written_pods() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((FIXTURES / "pods").glob("*.json"))}


def admission_review(obj, operation="CREATE", kind=None) -> dict:
    kind = kind or {"group": "", "version": "v1", "kind": "Pod"}
    meta = (obj or {}).get("metadata", {})
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": {"group": kind["group"], "version": kind["version"], "resource": kind["kind"].lower() + "s"},
            "requestKind": kind,
            "namespace": meta.get("namespace", "default"),
            "name": meta.get("name", ""),
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


# ---------------------------------------------------------------- checks


def validate(pod: dict, what: str):
    try:
        kubernetes_validate.validate(pod, KUBE_NEWEST, strict=True)
    except kubernetes_validate.ValidationError as e:
        first = str(e).splitlines()[0]
        where = "/".join(str(p) for p in getattr(e, "path", []))
        pytest.fail(f"{what} does not validate against Kubernetes {KUBE_NEWEST} (strict): {first} at {where}")


def apply_patch(pod: dict, response: dict):
    assert response["allowed"] is True, response.get("status")
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    return jsonpatch.JsonPatch(ops).apply(pod), ops


def resolve_port(container: dict, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return int(port)


def expected_records(pod: dict) -> dict:
    """The `palisade.dev/app-probes` annotation, computed independently of the injector."""
    spec = pod["spec"]
    probed = list(spec["containers"]) + [
        c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"
    ]
    records = {}
    for c in probed:
        for field, kind in PROBE_KINDS.items():
            probe = c.get(field, {})
            for handler in HANDLERS:
                if handler in probe:
                    original = copy.deepcopy(probe[handler])
                    original["port"] = resolve_port(c, original["port"])
                    records[f"{c['name']}/{kind}"] = {handler: original}
    return records


def expected_probe(container_name: str, field: str, probe: dict) -> dict:
    handler = next((h for h in HANDLERS if h in probe), None)
    if handler is None:
        return probe
    rewritten = {k: v for k, v in probe.items() if k != handler}
    rewritten["httpGet"] = {
        "path": f"/app-health/{container_name}/{PROBE_KINDS[field]}",
        "port": 15021,
        "scheme": "HTTP",
    }
    return rewritten


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def check_injected(original: dict, mutated: dict, native: bool = True):
    """Exact comparison of everything the injector adds or rewrites; the rest must be untouched."""
    spec, new = original["spec"], mutated["spec"]
    init_names = [c["name"] for c in spec.get("initContainers", [])]
    app_names = [c["name"] for c in spec["containers"]]
    if native:
        assert [c["name"] for c in new["initContainers"]] == ["palisade-init", "palisade-proxy", *init_names]
        assert [c["name"] for c in new["containers"]] == app_names
        proxy = new["initContainers"][1]
        assert proxy["restartPolicy"] == "Always"
        assert proxy["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
        assert "lifecycle" not in proxy
    else:
        assert [c["name"] for c in new["initContainers"]] == ["palisade-init", *init_names]
        assert [c["name"] for c in new["containers"]] == ["palisade-proxy", *app_names]
        proxy = new["containers"][0]
        assert "restartPolicy" not in proxy
        assert proxy["lifecycle"] == {"postStart": {"exec": {"command": ["palisade-proxy", "wait-ready"]}}}
    init = new["initContainers"][0]
    assert init["command"][:2] == ["palisade-proxy", "init"]
    assert init["securityContext"] == INIT_SECURITY_CONTEXT
    assert proxy["command"] == ["palisade-proxy", "run"]
    assert proxy["securityContext"] == PROXY_SECURITY_CONTEXT
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert proxy["volumeMounts"] == [
        {"name": "palisade-token", "mountPath": "/var/run/palisade/token", "readOnly": True},
        {"name": "palisade-trust-anchors", "mountPath": "/var/run/palisade/trust", "readOnly": True},
        {"name": "palisade-init-report", "mountPath": "/var/run/palisade/init", "readOnly": True},
    ]
    assert init["volumeMounts"] == [{"name": "palisade-init-report", "mountPath": "/var/run/palisade/init"}]
    env = env_of(proxy)
    assert env["PALISADE_CA_ADDR"] == "palisade-ca.palisade-system.svc:15012"
    assert env["PALISADE_CA_NAME"] == "palisade-ca.palisade-system.svc"
    assert env["PALISADE_TRUST_ANCHORS"] == "/var/run/palisade/trust/ca.pem"
    assert env["PALISADE_TOKEN_FILE"] == "/var/run/palisade/token/token"
    assert env["PALISADE_INBOUND_LISTEN"] == "0.0.0.0:15006"
    assert env["PALISADE_OUTBOUND_LISTEN"] == "127.0.0.1:15001"
    assert env["PALISADE_ADMIN_LISTEN"] == "0.0.0.0:15021"
    for name, path in [("PALISADE_NAMESPACE", "metadata.namespace"),
                       ("PALISADE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
                       ("PALISADE_POD_NAME", "metadata.name"), ("PALISADE_POD_IP", "status.podIP"),
                       ("PALISADE_APP_PROBES", "metadata.annotations['palisade.dev/app-probes']"),
                       ("PALISADE_INBOUND_LOOPBACK_PORTS",
                        "metadata.annotations['palisade.dev/inbound-loopback-ports']"),
                       ("PALISADE_ADMIN_REMOTE_METRICS",
                        "metadata.annotations['palisade.dev/admin-remote-metrics']")]:
        assert env[name] == {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}, name

    assert [v["name"] for v in new["volumes"]] == [v["name"] for v in spec.get("volumes", [])] + [
        "palisade-token", "palisade-trust-anchors", "palisade-init-report"]
    assert new["volumes"][-3:] == VOLUMES
    assert mutated["metadata"]["labels"]["palisade.dev/injected"] == "true"

    # Probes: each rewritten exactly, and the originals recorded for the proxy.
    records = expected_records(original)
    annotations = mutated["metadata"].get("annotations", {})
    if records:
        assert json.loads(annotations["palisade.dev/app-probes"]) == records
    else:
        assert "palisade.dev/app-probes" not in annotations
    by_name = {c["name"]: c for c in new["containers"] + new["initContainers"]}
    for c in spec["containers"] + [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]:
        for field in PROBE_KINDS:
            if field in c:
                assert by_name[c["name"]][field] == expected_probe(c["name"], field, c[field]), (c["name"], field)

    # Undo exactly what was promised; what is left must be the original pod.
    undone = copy.deepcopy(mutated)
    u = undone["spec"]
    u["initContainers"] = [c for c in u["initContainers"] if c["name"] not in ("palisade-init", "palisade-proxy")]
    u["containers"] = [c for c in u["containers"] if c["name"] != "palisade-proxy"]
    if not u["initContainers"] and "initContainers" not in spec:
        del u["initContainers"]
    u["volumes"] = u["volumes"][:-len(VOLUMES)]
    if not u["volumes"] and "volumes" not in spec:
        del u["volumes"]
    for c in u["containers"] + u.get("initContainers", []):
        source = next(o for o in spec["containers"] + spec.get("initContainers", []) if o["name"] == c["name"])
        for field in PROBE_KINDS:
            if field in source:
                c[field] = source[field]
    meta = undone["metadata"]
    del meta["labels"]["palisade.dev/injected"]
    if not meta["labels"] and "labels" not in original["metadata"]:
        del meta["labels"]
    if records:
        del meta["annotations"]["palisade.dev/app-probes"]
        if not meta["annotations"] and "annotations" not in original["metadata"]:
            del meta["annotations"]
    assert undone == original


def inject_and_check(inj: Injector, pod: dict, what: str, native: bool = True) -> dict:
    validate(pod, f"{what} (as given)")
    response = inj.review(admission_review(copy.deepcopy(pod)))
    mutated, _ = apply_patch(copy.deepcopy(pod), response)
    validate(mutated, f"{what} after injection")
    check_injected(pod, mutated, native=native)
    again = inj.review(admission_review(copy.deepcopy(mutated)))
    assert again["allowed"] is True
    assert "patch" not in again, f"{what}: the injected pod was patched again"
    assert again["auditAnnotations"]["decision"] == "skipped: already_injected"
    return mutated


def bare_pod_with(**changes):
    pod = copy.deepcopy(hand_written_pods()["bare"])
    for path, value in changes.items():
        target = pod
        *parents, leaf = path.split("__")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return pod
