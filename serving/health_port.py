"""The health probes on a port of their own, answered by a small process that never waits behind request work.

The main port's /v1/health/live and /v1/health/ready run on the worker's event loop, the loop that also parses,
tokenises and answers every request: under a flood a probe queues behind the requests that arrived before it, and
a kubelet (1 s timeout by default) can restart a replica that is merely busy. A thread in the worker does not
escape it either: under load it waits for the GIL at every step, behind the loop and the worker's other threads.

So on `EMBED_HEALTH_PORT` the two routes are answered by a process of its own (`python -m serving.health_port`,
the standard library's HTTP server, nothing else imported). The worker publishes what each route answers, status
and body as the main port computes them (serving/info.py), to a small state file: a thread rewrites it every
`interval_s`, which doubles as a heartbeat. A state older than STALE_S (a worker frozen or gone) answers 503 on
both routes. The prober exits when its worker does.

Every worker starts its own prober on the port (SO_REUSEPORT); the kernel spreads probes over them. Nothing else is
served there: it is meant for the cluster's probes only.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# (status, body) of each route, computed when asked; the service supplies them.
Probe = Callable[[], tuple[int, dict]]
# A worker whose state is older than this is frozen or gone: probes fail, so the cluster restarts or bypasses it.
# Generous: a worker saturated by requests still runs its publishing thread within a few GIL turns.
STALE_S = 30.0


class Probes:
    """The prober process and the worker's publishing thread; `shutdown()` stops both."""

    def __init__(self, port: int, routes: dict[str, Probe], host: str, interval_s: float):
        self.routes, self.interval_s = routes, interval_s
        self._dir = tempfile.mkdtemp(prefix="nim-probes-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.state_file = Path(self._dir) / "state.json"
        self.publish()  # before the prober starts: it never answers without a state
        self._stop = threading.Event()
        self._publisher = threading.Thread(target=self._publish_every_interval, name="health-publish", daemon=True)
        self._publisher.start()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.health_port", "--port", str(port), "--host", host,
             "--state", str(self.state_file), "--parent", str(os.getpid())],
            cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL)

    def publish(self) -> None:
        state = {"time": time.time(), "routes": {path: probe() for path, probe in self.routes.items()}}
        tmp = self.state_file.with_suffix(".partial")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # the prober reads the old state or the new one, never half of one

    def _publish_every_interval(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # a full /dev/shm, say: the prober reports the state as stale, the worker goes on
                log.exception("publishing the probes' state failed")

    def shutdown(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for name in ("state.json", "state.partial"):
            (Path(self._dir) / name).unlink(missing_ok=True)
        try:
            os.rmdir(self._dir)
        except OSError:  # the prober removed it first
            pass


def serve_probes(port: int, routes: dict[str, Probe], host: str = "0.0.0.0", interval_s: float = 0.5) -> Probes:
    """Answer `routes` (path -> probe) on `port` from a process of their own, as each probe said within the last
    `interval_s`."""
    probes = Probes(port, routes, host, interval_s)
    log.info("health probes also on port %d (process %d)", port, probes.process.pid)
    return probes


# ---- the prober process -------------------------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):  # one listener per worker on the same port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def answer(state_file: Path, path: str, now: float | None = None) -> tuple[int, dict]:
    """What the prober answers on `path`, from the worker's last published state."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    routes = state["routes"] if state else {}
    if path not in routes and path not in ("/v1/health/live", "/v1/health/ready"):
        return 404, {"object": "error", "message": f"route {path} not found", "type": "NotFoundError"}
    if state is None or (now or time.time()) - state["time"] > STALE_S:
        return 503, {"object": "health.response", "message": "the server process is not responding",
                     "live" if path.endswith("/live") else "ready": False}
    status, body = routes[path]
    return status, body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="answer the health probes from a worker's published state")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True, help="the worker: exit when it is gone")
    args = parser.parse_args(argv)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            status, body = answer(args.state, self.path.split("?", 1)[0])
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_HEAD = do_GET

        def log_message(self, format: str, *args) -> None:  # probes are not access-logged
            pass

    server = _Server((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    while os.getppid() == args.parent:  # the worker exited (or was killed): so does its prober
        time.sleep(1)
    for path in (args.state, args.state.with_suffix(".partial")):  # what a killed worker could not remove
        path.unlink(missing_ok=True)
    try:
        args.state.parent.rmdir()
    except OSError:
        pass


if __name__ == "__main__":
    main()
