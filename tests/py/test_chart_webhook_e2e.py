"""The chart and the real injector together: `palisade-injector` (the binary scripts/test.sh
builds, PALISADE_BIN_DIR) runs with exactly the arguments and environment the chart renders for
it, and the serving certificate from the rendered Secret. The test then plays the API server:
it calls https://palisade-injector.<ns>.svc/mutate trusting only the webhook's caBundle, sends
a pod's AdmissionReview, and checks that the mutated pod carries what the chart's values say
(proxy image, CA address and name, native or classic sidecar, proxy resources and log level).

Each value set is rendered with injector.webhook.certIssuer chart, so that the Secret and the
caBundle are in the manifest (with the default, palisade-ca, the CA writes them at run time);
the injector's flags and environment do not depend on certIssuer.

Only the listen addresses (to 127.0.0.1 with kernel-chosen ports), the certificate paths (to
files holding the rendered Secret's keys) and the log format (json, to read the bound addresses)
are changed."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import jsonpatch
import pytest

from chart_support import REPO, render_chart_cert

BIN_DIR = Path(os.environ.get("PALISADE_BIN_DIR", REPO / "target" / "debug"))
VALUE_SETS_TO_RUN = ["default", "native-sidecar-off", "custom-namespace-trust-domain", "pinned-digests"]

APP_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "api-0", "namespace": "shop", "labels": {"app": "api"}},
    "spec": {
        "serviceAccountName": "api",
        "containers": [
            {
                "name": "api",
                "image": "registry.example.com/shop/api:1.0",
                "ports": [{"containerPort": 8080, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            }
        ],
    },
}


class RunningInjector:
    def __init__(self, rendered, tmp: Path):
        ns = rendered.value_set.namespace
        secret = rendered.one("Secret", "palisade-injector-tls")["data"]
        for key in ("tls.crt", "tls.key"):
            (tmp / key).write_bytes(base64.b64decode(secret[key]))
        (hook,) = rendered.one("MutatingWebhookConfiguration", "palisade-injector")["webhooks"]
        self.ca_bundle = base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
        self.service_host = f"{hook['clientConfig']['service']['name']}.{ns}.svc"
        self.path = hook["clientConfig"]["service"]["path"]

        (c,) = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["containers"]
        overrides = {
            "--tls-cert": str(tmp / "tls.crt"),
            "--tls-key": str(tmp / "tls.key"),
            "--listen": "127.0.0.1:0",
            "--admin-listen": "127.0.0.1:0",
        }
        args = list(c["args"])
        for i in range(1, len(args), 2):
            args[i + 1] = overrides.get(args[i], args[i + 1])
        binary = BIN_DIR / "palisade-injector"
        assert binary.is_file(), f"{binary} is missing: scripts/test.sh builds it and sets PALISADE_BIN_DIR"
        # Only the chart's variables: nothing from the test's own environment leaks in.
        env = {"PATH": "/usr/bin:/bin", **{e["name"]: e["value"] for e in c.get("env", [])}}
        env["PALISADE_LOG_FORMAT"] = "json"  # to read the bound addresses from the log
        self.proc = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.logs: list[str] = []
        self.webhook_port = self.admin_port = None
        deadline = time.monotonic() + 20
        while self.webhook_port is None:
            line = self.proc.stderr.readline()
            if not line:
                self.proc.wait(timeout=5)
                pytest.fail(f"palisade-injector exited ({self.proc.returncode}) with the chart's settings:\n"
                            + "".join(self.logs))
            self.logs.append(line)
            try:
                fields = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "webhook_addr" in fields:
                self.webhook_port = int(fields["webhook_addr"].rsplit(":", 1)[1])
                self.admin_port = int(fields["admin_addr"].rsplit(":", 1)[1])
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("palisade-injector did not report its addresses:\n" + "".join(self.logs))
        threading.Thread(target=lambda: self.logs.extend(self.proc.stderr), daemon=True).start()

    def call_as_api_server(self, review: dict) -> tuple[int, dict]:
        context = ssl.create_default_context(cadata=self.ca_bundle)
        port, host = self.webhook_port, self.service_host

        class ServiceConnection(http.client.HTTPSConnection):
            # Connect to loopback, but verify the certificate as palisade-injector.<ns>.svc.
            def connect(self):
                raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                self.sock = context.wrap_socket(raw, server_hostname=host)

        conn = ServiceConnection(host, port, context=context, timeout=10)
        try:
            conn.request("POST", self.path, body=json.dumps(review), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def admin(self, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def review_for(pod: dict) -> dict:
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": kind,
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"],
            "name": pod["metadata"]["name"],
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


@pytest.mark.parametrize("name", VALUE_SETS_TO_RUN)
def test_injector_runs_with_the_charts_settings(name, tmp_path):
    rendered = render_chart_cert(name)
    vs = rendered.value_set
    injector = RunningInjector(rendered, tmp_path)
    try:
        assert injector.admin("/live") == 200
        status, answer = injector.call_as_api_server(review_for(APP_POD))
        assert status == 200, answer
        response = answer["response"]
        assert response["allowed"] is True, response
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        pod = jsonpatch.apply_patch(APP_POD, patch)
    finally:
        injector.stop()

    native = vs.values.get("injector", {}).get("nativeSidecar", True)
    (c,) = rendered.one("Deployment", "palisade-injector")["spec"]["template"]["spec"]["containers"]
    flags = dict(zip(c["args"][1::2], c["args"][2::2], strict=True))
    proxies = [x for x in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if x["name"] == "palisade-proxy"]
    assert len(proxies) == 1, pod["spec"]
    proxy = proxies[0]
    if native:
        assert proxy in pod["spec"]["initContainers"] and proxy.get("restartPolicy") == "Always"
    else:
        assert pod["spec"]["containers"][0] == proxy
    init = [x for x in pod["spec"]["initContainers"] if x["name"] == "palisade-init"]
    assert len(init) == 1 and init[0]["image"] == flags["--proxy-image"]
    assert proxy["image"] == flags["--proxy-image"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["PALISADE_CA_ADDR"] == f"palisade-ca.{vs.namespace}.svc:15012"
    assert env["PALISADE_CA_NAME"] == f"palisade-ca.{vs.namespace}.svc"
    proxy_values = vs.values.get("proxy", {})
    assert env["PALISADE_LOG"] == proxy_values.get("log", {}).get("level", "info")
    resources = proxy["resources"]
    assert resources["requests"] == {"cpu": "100m", "memory": "64Mi"}
    assert resources["limits"]["memory"] == "256Mi"
    cpu_limit = proxy_values.get("resources", {}).get("limits", {}).get("cpu")
    assert resources["limits"].get("cpu") == (cpu_limit or None)
    assert pod["metadata"]["labels"]["palisade.dev/injected"] == "true"
