"""The kubelet's log endpoint for the pods of the harness's kwok Nodes, so that `kubectl logs` and client SDKs
read through the apiserver what a pod runner's process wrote.

kwok advertises every kwok Node at 127.0.0.1 with this server's port as the kubelet port; the apiserver then
asks `GET https://127.0.0.1:<port>/containerLogs/<namespace>/<pod>/<container>` (with the harness CA, the
server's certificate is one of its). The answer is the file `<dir>/<namespace>_<pod>.log`, which a PodRunner
links to its pod's output (all of the pod's containers, one after another); `tailLines` and `limitBytes` are
honoured, `follow` returns what is there now. A pod no runner ran (kwok's own) gets 404, as a kubelet that
has no such container. See docs/cluster-harness.md ("Pod logs").

Usage: python k8s_logserver.py --port P --cert tls.crt --key tls.key --dir DIR
"""

from __future__ import annotations

import argparse
import re
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from k8s_podrunner import STEP_MARKER

_PATH = re.compile(r"^/containerLogs/([a-z0-9.-]+)/([a-z0-9.-]+)/([a-z0-9.-]+)$")


def select(text: bytes, query: dict[str, list[str]]) -> bytes:
    """The container's output in a pod runner's log (without its STEP_MARKER lines), the part the kubelet's
    query parameters ask for (tailLines, then limitBytes)."""
    marker = STEP_MARKER.encode()
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(marker)]
    text = b"".join(lines)
    if "tailLines" in query:
        count = int(query["tailLines"][0])
        text = b"".join(lines[-count:]) if count > 0 else b""
    if "limitBytes" in query:
        text = text[: int(query["limitBytes"][0])]
    return text


def handler(log_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            if url.path == "/healthz":
                return self._send(200, b"ok")
            match = _PATH.match(url.path)
            if not match:
                return self._send(404, f"no such endpoint {url.path}\n".encode())
            namespace, pod, container = match.groups()
            path = log_dir / f"{namespace}_{pod}.log"
            if not path.exists():
                return self._send(404, f"container {container} of pod {namespace}/{pod} has no log here\n".encode())
            try:
                return self._send(200, select(path.read_bytes(), parse_qs(url.query)))
            except ValueError as e:
                return self._send(400, f"bad query {url.query}: {e}\n".encode())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(args.dir))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
