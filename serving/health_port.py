"""The health probes on a port of their own, answered by a thread that never waits behind request work.

The main port's /v1/health/live and /v1/health/ready run on the worker's event loop, the loop that also parses,
tokenises and answers every request: under a flood a probe queues behind the requests that arrived before it, and
a kubelet (1 s timeout by default) can restart a replica that is merely busy. On `EMBED_HEALTH_PORT` the same two
routes are answered by a plain thread (the standard library's HTTP server): it needs only the GIL, which Python hands
to a waiting thread within its switch interval (5 ms) whatever the loop is doing.

Every worker listens on the port (SO_REUSEPORT); the kernel spreads probes over them. The bodies and statuses are
the main port's (serving/info.py). Nothing else is served there: it is meant for the cluster's probes only.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
from typing import Callable

log = logging.getLogger(__name__)

# (status, body) of each route, computed when asked; the service supplies them.
Probe = Callable[[], tuple[int, dict]]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):  # one listener per worker process on the same port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def serve_probes(port: int, routes: dict[str, Probe], host: str = "0.0.0.0") -> http.server.HTTPServer:
    """Start answering `routes` (path -> probe) on `port` in a daemon thread; returns the server (shutdown())."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            probe = routes.get(self.path.split("?", 1)[0])
            if probe is None:
                status, body = 404, {"object": "error", "message": f"route {self.path} not found",
                                     "type": "NotFoundError"}
            else:
                status, body = probe()
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_HEAD = do_GET

        def log_message(self, format: str, *args) -> None:  # probes are not access-logged
            pass

    server = _Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health-port", daemon=True).start()
    log.info("health probes also on port %d", port)
    return server
