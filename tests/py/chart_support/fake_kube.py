"""A minimal Kubernetes API on 127.0.0.1 for the chart's `lookup` calls.

Helm's `lookup "v1" "Secret" ns name` asks discovery for the core group (GET /api/v1) and then
GETs the object; both answers here are shaped as the API server gives them (APIResourceList,
the object, or a 404 Status). Nothing else is served; every request is recorded."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

CORE_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    ],
}


def not_found(path: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"{path} not found", "reason": "NotFound", "code": 404}


class FakeKube:
    def __init__(self, objects: dict[str, dict[str, Any]]):
        # {"/api/v1/namespaces/<ns>/secrets/<name>": object}
        self.objects = objects
        self.requests: list[str] = []

    def kubeconfig(self, port: int, namespace: str) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
            "users: [{name: test, user: {token: test}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: test, namespace: {namespace}}}}}]\n"
            "current-context: fake\n"
        )

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                fake.requests.append(path)
                if path == "/api/v1":
                    self.reply(200, CORE_RESOURCES)
                elif path in fake.objects:
                    self.reply(200, fake.objects[path])
                else:
                    self.reply(404, not_found(path))

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


@contextlib.contextmanager
def serve(objects: dict[str, dict[str, Any]], namespace: str) -> Iterator[tuple[FakeKube, str]]:
    """Yields (fake, kubeconfig) while the fake API listens on an ephemeral loopback port."""
    fake = FakeKube(objects)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, fake.kubeconfig(server.server_address[1], namespace)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
