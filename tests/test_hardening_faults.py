"""Faults at the edges of a server's life: SIGTERM drains the requests in flight and refuses new
connections; a missing or corrupt checkpoint stops `bentoml serve` at once, non-zero, with the reason in its log.
(A failed forward pass is retried in halves: tests/test_hardening_units.py.)"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service_fixtures import MODEL_ID, ROOT, SERVER_ENV, launch


def test_sigterm_drains_requests_in_flight_then_refuses_connections(nim_server, tiny_checkpoint, tmp_path):
    """As Kubernetes stops a pod: SIGTERM to the main process only. Slow requests (2 s in the batch) finish with
    200; meanwhile and afterwards, new connections are refused rather than left hanging."""
    cache = Path(nim_server.env["EMBED_CACHE_DIR"])
    with launch(tiny_checkpoint, tmp_path, {"EMBED_STARTUP_DELAY_S": "0", "EMBED_FAULT_BATCH_DELAY_S": "2"},
                cache_dir=cache) as (server, proc):
        host, port = server.url.removeprefix("http://").split(":")

        def connect() -> str:
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return "connected"
            except ConnectionRefusedError:
                return "refused"
            except OSError as e:
                return type(e).__name__

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                slow = [asyncio.create_task(c.post("/v1/embeddings", json={"model": MODEL_ID, "input": [f"slow {i}"]}))
                        for i in range(3)]
                await asyncio.sleep(1.0)  # all three are in flight
                assert not any(t.done() for t in slow)
                os.kill(proc.pid, signal.SIGTERM)
                await asyncio.sleep(0.5)
                during = await asyncio.to_thread(connect)
                return await asyncio.gather(*slow), during

        responses, during = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
        assert all(len(r.json()["data"]) == 1 for r in responses)
        assert during == "refused"
        assert proc.wait(30) == 0  # a clean exit once drained
        assert connect() == "refused"
        log = server.log_text()
        assert "SIGTERM: stopped listening on 1 socket(s); draining 3 request(s)" in log


def _serve_and_fail(model: str, tmp_path: Path, **extra: str) -> tuple[int, str, float]:
    env = {**os.environ, **SERVER_ENV, "EMBED_MODEL": model, "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "JAX_PLATFORMS": "cpu", **extra}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bentoml", "serve", "--port", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def test_a_missing_or_corrupt_checkpoint_stops_the_server_at_once(tiny_checkpoint, tmp_path):
    code, log, seconds = _serve_and_fail(str(tmp_path / "no-such-model"), tmp_path)
    assert code != 0 and seconds < 60
    assert f"FATAL: cannot serve EMBED_MODEL={tmp_path / 'no-such-model'}: " in log and "does not exist" in log
    assert "Traceback" not in log  # one line saying what is wrong, not a stack
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    code, log, _ = _serve_and_fail(str(corrupt), tmp_path)
    assert code != 0 and "model.safetensors" in log and "truncated or corrupt" in log
    code, log, _ = _serve_and_fail(str(tiny_checkpoint), tmp_path, EMBED_API_KEYS_FILE=str(tmp_path / "no-keys"))
    assert code != 0 and "FATAL: EMBED_API_KEYS_FILE=" in log and "cannot be read" in log
