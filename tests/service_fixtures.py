"""A real `bentoml serve` of the tiny random checkpoint, shared by the service tests.

    (registered for every test module by tests/conftest.py: one server for the whole test run)

`nim_server` (session-scoped) starts the server on a free port with the limits below, records what the probes and the
embeddings route answered while the model was loading (EMBED_STARTUP_DELAY_S keeps that window open), waits for
/v1/health/ready and kills the process group at the end. `server` is the same server per test, and prints the part
of the server log written during a test that failed.

`guarded_server` (session-scoped) is a second one with API keys, CORS, tiny admission limits, a 1 s request timeout
and a 1.5 s delay in every batch (so every embedding times out, deterministically), for the overload and access tests.
`launch()` starts any other variant (tests/test_hardening_faults.py), sharing the first one's caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "nvidia/llama-nemotron-embed-vl-1b-v2"
# Limits small enough that a test crosses each one cheaply on CPU (tiny checkpoint: 64-px tiles, 4 tokens each;
# an image is 1, 3, 5 or 7 tiles, so 32 tokens admit up to 5 tiles and refuse 7).
SERVER_ENV = {
    "EMBED_DTYPE": "float32",  # parity with the library's float32 Embedder, on a GPU too (default there: bfloat16)
    "EMBED_MAX_TOKENS_TEXT": "64",
    "EMBED_MAX_TOKENS_IMAGE": "32",
    "EMBED_MAX_TOKENS_TEXT_IMAGE": "48",
    "EMBED_MAX_IMAGE_BYTES": str(256 * 1024),
    "EMBED_MAX_BODY_BYTES": str(2 * 1024 * 1024),
    "EMBED_STARTUP_DELAY_S": "3",
}
STARTUP_TIMEOUT_S = 300


@dataclasses.dataclass
class Server:
    url: str
    log: Path
    env: dict[str, str]
    # (route, status, body) answered before the model was ready: the readiness tests read these.
    while_loading: list[tuple[str, int, Any]] = dataclasses.field(default_factory=list)

    def log_text(self, offset: int = 0) -> str:
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit RGB), then IEND: a header with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_startup(server: Server, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    loading_probed = False
    with httpx.Client(base_url=server.url, timeout=10) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log_text()}")
            try:
                ready = client.get("/v1/health/ready")
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if ready.status_code == 200:
                return
            if not loading_probed:  # the first answers, while the model is still loading
                loading_probed = True
                server.while_loading.append(("/v1/health/ready", ready.status_code, ready.json()))
                live = client.get("/v1/health/live")
                server.while_loading.append(("/v1/health/live", live.status_code, live.json()))
                emb = client.post("/v1/embeddings", json={"model": MODEL_ID, "input": "hello"})
                server.while_loading.append(("/v1/embeddings", emb.status_code,
                                             {"json": emb.json(), "retry_after": emb.headers.get("retry-after")}))
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def start(checkpoint: Path | str, work: Path, extra_env: dict[str, str] | None = None,
          cache_dir: Path | None = None) -> tuple[Server, subprocess.Popen]:
    """`bentoml serve` in its own process group (not waited for), logging to work/server.log."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **SERVER_ENV,
           "EMBED_MODEL": str(checkpoint),
           "EMBED_CACHE_DIR": str(cache_dir or work / "cache"),
           "BENTOML_HOME": str(work / "bentoml"),  # its own Prometheus directory, not a developer's server's
           "BENTOML_DO_NOT_TRACK": "true",
           "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    server = Server(f"http://127.0.0.1:{port}", work / "server.log", env)
    with open(server.log, "wb") as log:  # the CLI exactly as documented, run by this interpreter
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return server, proc


@contextlib.contextmanager
def launch(checkpoint: Path | str, work: Path, extra_env: dict[str, str] | None = None,
           cache_dir: Path | None = None):
    """A started and ready server (and its process), stopped at the end."""
    server, proc = start(checkpoint, work, extra_env, cache_dir)
    try:
        _wait_for_startup(server, proc)
        yield server, proc
    finally:
        _stop(proc)
        if os.environ.get("NIM_TEST_SHOW_LOG"):
            print(server.log_text())


@pytest.fixture(scope="session")
def nim_server(tiny_checkpoint, tmp_path_factory):
    with launch(tiny_checkpoint, tmp_path_factory.mktemp("nim_server")) as (server, _):
        yield server


API_KEYS = ("key-from-env-1", "key-from-env-2")
FILE_KEY = "key-from-file"
GUARDED_ENV = {
    "EMBED_STARTUP_DELAY_S": "0",
    "EMBED_API_KEYS": ",".join(API_KEYS),
    "EMBED_CORS_ORIGINS": "https://app.example",
    "EMBED_MAX_INFLIGHT_INPUTS": "4",
    "NIM_REQUEST_TIMEOUT_S": "1",
    "EMBED_FAULT_BATCH_DELAY_S": "1.5",
}


@pytest.fixture(scope="session")
def guarded_server(nim_server, tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("guarded_server")
    keys = work / "keys.txt"
    keys.write_text(f"# one key a line\n{FILE_KEY}\n\n")
    env = {**GUARDED_ENV, "EMBED_API_KEYS_FILE": str(keys), "EMBED_HEALTH_PORT": str(free_port())}
    with launch(tiny_checkpoint, work, env, cache_dir=Path(nim_server.env["EMBED_CACHE_DIR"])) as (server, _):
        yield server


def _stop(proc: subprocess.Popen) -> None:
    """Stop the whole process group (BentoML's workers included)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(nim_server, request):
    """The test run's server; a failing test shows the server log it produced."""
    offset = nim_server.log.stat().st_size
    failed_before = request.session.testsfailed
    yield nim_server
    if request.session.testsfailed > failed_before:
        print(f"---- server log ({nim_server.log}) during {request.node.name} ----")
        print(nim_server.log_text(offset)[-20000:])
