"""serving/health_port.py: the probes on a port of their own, answered from a thread."""

from __future__ import annotations

import threading

import httpx

from serving import info
from serving.health_port import serve_probes
from tests.service_fixtures import free_port


def test_probes_answer_their_status_and_body_and_nothing_else():
    state = {"ready": False}
    port = free_port()
    server = serve_probes(port, {
        "/v1/health/live": lambda: (200, info.live(True)),
        "/v1/health/ready": lambda: ((200, info.ready(True)) if state["ready"] else (503, info.ready(False, "loading"))),
    }, host="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/v1/health/live").json() == {"object": "health.response", "message": "live",
                                                              "live": True}
        not_ready = httpx.get(base + "/v1/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        state["ready"] = True
        assert httpx.get(base + "/v1/health/ready?x=1").status_code == 200
        missing = httpx.get(base + "/v1/embeddings")
        assert missing.status_code == 404 and missing.json()["type"] == "NotFoundError"
    finally:
        server.shutdown()


def test_probes_are_answered_while_another_thread_keeps_python_busy():
    """The event loop's thread may be saturated by request work; the probe thread still gets the interpreter."""
    port = free_port()
    server = serve_probes(port, {"/v1/health/live": lambda: (200, info.live(True))}, host="127.0.0.1")
    stop = threading.Event()

    def spin() -> None:  # pure-Python work that holds the GIL between switches
        n = 0
        while not stop.is_set():
            n += 1

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        for _ in range(5):
            assert httpx.get(f"http://127.0.0.1:{port}/v1/health/live", timeout=10).status_code == 200
    finally:
        stop.set()
        busy.join()
        server.shutdown()
