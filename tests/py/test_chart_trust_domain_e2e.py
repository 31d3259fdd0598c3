"""A chart `trustDomain` other than cluster.local, end to end: the chart's injector mutates a pod,
and the proxy it injects, run with exactly that container's environment, gets ready against a CA
run with the trust domain and namespace the chart gives the CA Deployment.

1. Render the value set "custom-namespace-trust-domain" (trustDomain prod.example.org, namespace
   mesh-control); for the injector's serving certificate, with certIssuer chart (see
   test_chart_webhook_e2e.py).
2. Run `palisade-injector` as tests/py/test_chart_webhook_e2e.py does (RunningInjector: the
   chart's flags and environment) and apply its patch to APP_POD.
3. Run `palisade-ca serve` in embedded mode (`--source file --auth local`; a cluster has no such
   CA, but a file source and local tokens are what can run here) with `--trust-domain` and
   `--namespace` read from the rendered CA Deployment's args, loopback listeners on port 0, a
   state dir in tmp_path, and a mesh file naming the pod as a workload at POD_IP (127.0.77.2: on
   Linux all of 127/8 is loopback, so the "pod" gets an address of its own). A token for
   shop/api comes from `palisade-ca token`, the trust bundle from `palisade-ca bundle`.
4. Run `palisade-proxy run` with the injected palisade-proxy container's env and nothing else
   (PATH only): every `value` as given, every `valueFrom.fieldRef` resolved from the mutated pod
   as the kubelet does (status.podIP -> POD_IP; a missing annotation -> ""). Replaced, because
   they name things a cluster provides and this machine does not:
   - PALISADE_CA_ADDR: the Service palisade-ca.<ns>.svc:15012 does not resolve here, so the
     CA's bound 127.0.0.1:port. PALISADE_CA_NAME stays as injected: the CA's serving
     certificate carries DNS SAN palisade-ca.<its --namespace>.svc, so the name is still checked.
   - PALISADE_TRUST_ANCHORS, PALISADE_TOKEN_FILE: the injected paths are volume mounts (the
     palisade-trust-anchors ConfigMap, the projected token); here, files holding the bundle and
     the token.
   - PALISADE_INBOUND_LISTEN, PALISADE_OUTBOUND_LISTEN, PALISADE_ADMIN_LISTEN: POD_IP, port 0,
     so nothing clashes with the host; the bound addresses are read from the proxy's log.
   - PALISADE_LOG_FORMAT: json (the proxy's default anyway), to read that log line.
5. The proxy's admin /ready must answer 200 within ~20 s, and /identity (asked from loopback)
   must name spiffe://prod.example.org/ns/shop/sa/api.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import threading
import time

import jsonpatch
import pytest
import yaml

from chart_support import command_line, containers, render, render_chart_cert
from test_chart_webhook_e2e import APP_POD, BIN_DIR, RunningInjector, review_for

VALUE_SET = "custom-namespace-trust-domain"
POD_IP = "127.0.77.2"
BASE_ENV = {"PATH": "/usr/bin:/bin"}
REPLACED = ("PALISADE_CA_ADDR", "PALISADE_TRUST_ANCHORS", "PALISADE_TOKEN_FILE", "PALISADE_INBOUND_LISTEN",
            "PALISADE_OUTBOUND_LISTEN", "PALISADE_ADMIN_LISTEN")


class Process:
    """A long-running binary whose output (stdout and stderr) is collected line by line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def tail(self, n: int = 40) -> str:
        return f"--- last lines of {self.name} ---\n" + "".join(self.lines[-n:])

    def wait_for_record(self, pick, what: str, timeout: float = 20):
        """The first non-None `pick(record)` over the json log records, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                time.sleep(0.2)  # let the collector read the last lines
            for line in list(self.lines):
                try:
                    found = pick(json.loads(line))
                except (json.JSONDecodeError, AttributeError, TypeError):
                    continue
                if found is not None:
                    return found
            if exited or time.monotonic() > deadline:
                state = f"exited {self.proc.returncode}" if exited else "still running"
                pytest.fail(f"{self.name} ({state}) did not report {what}\n{self.tail()}")
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def injected_pod(rendered, tmp) -> dict:
    tmp.mkdir()
    injector = RunningInjector(rendered, tmp)
    try:
        status, answer = injector.call_as_api_server(review_for(APP_POD))
    finally:
        injector.stop()
    assert status == 200 and answer["response"]["allowed"] is True, answer
    return jsonpatch.apply_patch(APP_POD, json.loads(base64.b64decode(answer["response"]["patch"])))


def field_ref(pod: dict, path: str) -> str:
    """What the kubelet puts into a downward-API variable of this pod (status.podIP: POD_IP)."""
    meta = pod["metadata"]
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"), "status.podIP": POD_IP}
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m is None:
        pytest.fail(f"the test does not know how to resolve fieldRef {path!r}")
    return meta.get(m.group(1), {}).get(m.group(2), "")


def container_env(container: dict, pod: dict) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        if "value" in e or "valueFrom" not in e:
            env[e["name"]] = e.get("value", "")
        elif set(e["valueFrom"]) == {"fieldRef"}:
            env[e["name"]] = field_ref(pod, e["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            pytest.fail(f"the test does not know how to resolve {e}")
    return env


def get(addr: str, path: str) -> tuple[int, str]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def ca_cli(*args: str) -> str:
    out = subprocess.run([str(BIN_DIR / "palisade-ca"), *args], env=BASE_ENV, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"palisade-ca {' '.join(args)}: {out.stderr}"
    return out.stdout


def test_proxy_is_ready_with_the_charts_trust_domain(tmp_path):
    rendered = render(VALUE_SET)
    pod = injected_pod(render_chart_cert(VALUE_SET), tmp_path / "injector")
    (proxy_container,) = [c for c in containers(pod["spec"]) if c["name"] == "palisade-proxy"]
    (ca_container,) = rendered.one("Deployment", "palisade-ca")["spec"]["template"]["spec"]["containers"]
    sub, ca_flags = command_line(ca_container["args"])
    assert sub == "serve"
    trust_domain, ca_namespace = ca_flags["--trust-domain"], ca_flags["--namespace"]
    ns, sa = pod["metadata"]["namespace"], pod["spec"]["serviceAccountName"]

    state, mesh_file = tmp_path / "ca-state", tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump({
        "trustDomain": trust_domain,
        "defaultPolicy": "all-authenticated",
        "workloads": [{"name": pod["metadata"]["name"], "namespace": ns, "serviceAccount": sa, "ips": [POD_IP],
                       "labels": pod["metadata"].get("labels", {})}],
    }))
    ca = proxy = None
    try:
        ca = Process("palisade-ca", [
            str(BIN_DIR / "palisade-ca"), "serve", "--state-dir", str(state), "--source", "file",
            "--mesh-file", str(mesh_file), "--auth", "local", "--trust-domain", trust_domain,
            "--namespace", ca_namespace, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        ], {**BASE_ENV, "PALISADE_LOG": "info", "PALISADE_LOG_FORMAT": "json"})
        ca_addr = ca.wait_for_record(lambda r: r.get("api_addr"), "its API address")
        token, bundle = tmp_path / "token", tmp_path / "ca.pem"
        token.write_text(ca_cli("token", "--state-dir", str(state), "--namespace", ns, "--service-account", sa))
        bundle.write_text(ca_cli("bundle", "--state-dir", str(state)))

        injected = container_env(proxy_container, pod)
        missing = [name for name in REPLACED if name not in injected]
        assert not missing, f"the injected proxy has no {missing}: {injected}"
        env = {**BASE_ENV, **injected, "PALISADE_CA_ADDR": ca_addr, "PALISADE_TRUST_ANCHORS": str(bundle),
               "PALISADE_TOKEN_FILE": str(token), "PALISADE_INBOUND_LISTEN": f"{POD_IP}:0",
               "PALISADE_OUTBOUND_LISTEN": f"{POD_IP}:0", "PALISADE_ADMIN_LISTEN": f"{POD_IP}:0",
               "PALISADE_LOG_FORMAT": "json"}
        proxy = Process("palisade-proxy", [str(BIN_DIR / "palisade-proxy"), "run"], env)
        admin = proxy.wait_for_record(
            lambda r: r.get("admin") if r.get("message") == "palisade-proxy started" else None, "its admin address")

        deadline, last = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            try:
                last = get(admin, "/ready")
            except OSError as e:
                last = (None, str(e))
            if last[0] == 200:
                break
            time.sleep(0.25)
        assert last is not None and last[0] == 200, (
            f"the proxy was not ready within 20 s (last /ready: {last})\n{proxy.tail()}\n{ca.tail()}")

        status, body = get(admin, "/identity")
        assert status == 200, body
        assert json.loads(body)["spiffe_id"] == f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
        assert trust_domain == "prod.example.org" and (ns, sa) == ("shop", "api")
    finally:
        for p in (proxy, ca):
            if p is not None:
                p.stop()
