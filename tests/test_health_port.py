"""serving/health_port.py: the probes on a port of their own, answered by a process of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from serving import info
from serving.health_port import STALE_S, answer, serve_probes
from tests.service_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]


def get_until(url: str, expected: int, timeout_s: float = 20.0) -> httpx.Response:
    """The first answer with status `expected` (the prober takes a moment to start, a state a moment to publish)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == expected or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_probes_answer_their_status_and_body_and_nothing_else():
    state = {"ready": False}
    port = free_port()
    probes = serve_probes(port, {
        "/v1/health/live": lambda: (200, info.live(True)),
        "/v1/health/ready": lambda: ((200, info.ready(True)) if state["ready"] else (503, info.ready(False, "loading"))),
    }, host="127.0.0.1", interval_s=0.05)
    try:
        base = f"http://127.0.0.1:{port}"
        assert get_until(base + "/v1/health/live", 200).json() == {"object": "health.response", "message": "live",
                                                                   "live": True}
        not_ready = httpx.get(base + "/v1/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        state["ready"] = True  # published within the interval
        assert get_until(base + "/v1/health/ready?x=1", 200, timeout_s=5).json()["ready"] is True
        missing = httpx.get(base + "/v1/embeddings")
        assert missing.status_code == 404 and missing.json()["type"] == "NotFoundError"
    finally:
        probes.shutdown()
    assert probes.process.poll() is not None and not probes.state_file.exists()


def test_probes_are_answered_while_the_worker_keeps_python_busy():
    """The worker's threads may all be saturated by request work; the prober is another process."""
    port = free_port()
    probes = serve_probes(port, {"/v1/health/live": lambda: (200, info.live(True))}, host="127.0.0.1")
    stop = threading.Event()

    def spin() -> None:  # pure-Python work that holds the GIL between switches
        n = 0
        while not stop.is_set():
            n += 1

    busy = [threading.Thread(target=spin) for _ in range(4)]
    try:
        get_until(f"http://127.0.0.1:{port}/v1/health/live", 200)
        for thread in busy:
            thread.start()
        for _ in range(5):
            assert httpx.get(f"http://127.0.0.1:{port}/v1/health/live", timeout=10).status_code == 200
    finally:
        stop.set()
        for thread in busy:
            if thread.ident is not None:  # started
                thread.join()
        probes.shutdown()


def test_a_stale_state_fails_both_probes(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"time": 1000.0, "routes": {"/v1/health/live": [200, {"live": true}], '
                     '"/v1/health/ready": [200, {"ready": true}]}}')
    assert answer(state, "/v1/health/live", now=1000.0 + STALE_S - 1) == (200, {"live": True})
    status, body = answer(state, "/v1/health/ready", now=1000.0 + STALE_S + 1)
    assert status == 503 and body["ready"] is False and "not responding" in body["message"]
    assert answer(tmp_path / "absent.json", "/v1/health/live")[0] == 503
    assert answer(state, "/v1/other", now=1000.0)[0] == 404


def test_the_prober_exits_with_its_worker():
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from serving.health_port import serve_probes
        serve_probes({port}, {{"/v1/health/live": lambda: (200, {{"live": True}})}}, host="127.0.0.1")
        time.sleep(600)
    """)], cwd=ROOT)
    try:
        assert get_until(f"http://127.0.0.1:{port}/v1/health/live", 200).status_code == 200
    finally:
        os.kill(worker.pid, signal.SIGKILL)  # no clean-up runs in the worker
        worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/health/live", timeout=1)
        except httpx.TransportError:
            return  # nobody listens any more
        time.sleep(0.2)
    raise AssertionError("the prober still answers after its worker was killed")
