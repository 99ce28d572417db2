"""Who may call, from which origin, and what was done: request ids, JSON access logs, API keys and CORS.

ASGI middlewares around every route (BentoML's own included), outermost first:

    RequestLog   x-request-id echoed (or generated) and one JSON line per request: time, request id, method, path,
                 status, duration, inputs, tokens. Never a body, a header value or a key.
    CORS         Starlette's CORSMiddleware, when EMBED_CORS_ORIGINS is set (it answers preflights itself).
    ApiKeyAuth   `Authorization: Bearer <key>` on every path but the public ones, when keys are configured.

Each request passes these middlewares once.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone

import orjson
from typing import Any, Callable, Iterable

from serving.errors import AuthenticationError
from serving.http import error_response

RECORD_KEY = "nim.access"  # the scope entry a handler fills with what the access log should say
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's id is logged: nothing that could forge a line

access_logger = logging.getLogger("serving.access")


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def annotate(scope: dict, **fields: Any) -> None:
    """Add fields (inputs, tokens) to this request's access-log line."""
    record = scope.get(RECORD_KEY)
    if record is not None:
        record.update(fields)


def _json_lines_to_stdout() -> None:
    """The access log is for machines: bare JSON lines on stdout, apart from BentoML's formatted log."""
    if not access_logger.handlers:
        access_logger.addHandler(LineBatches(sys.stdout))
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False


class LineBatches(logging.Handler):
    """Each record's message as one line on `stream`, written every `interval_s` by a daemon thread rather than one
    write and flush per record: that is a system call per request, a measurable share of a short request. Flushed
    at exit too (logging.shutdown)."""

    def __init__(self, stream, interval_s: float = 0.1, max_lines: int = 4096) -> None:
        super().__init__()
        self.stream, self.interval_s, self.max_lines = stream, interval_s, max_lines
        self._lines: list[str] = []
        self._writer = threading.Thread(target=self._write_every_interval, name="access-log", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:  # under the handler's lock (logging.Handler.handle)
        self._lines.append(record.getMessage())
        if len(self._lines) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # the lock emit runs under: no line is added while the buffer is taken
            lines, self._lines = self._lines, []
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # stdout closed or gone: the log is lost, the server goes on
                    pass

    def _write_every_interval(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.flush()


# Request ids: this process's random prefix and a counter. Unique across processes and restarts, as a uuid4 would be,
# without reading the OS's random source on every request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class RequestLog:
    def __init__(self, app: Any, enabled: bool = True) -> None:
        self.app, self.enabled = app, enabled
        if enabled:
            _json_lines_to_stdout()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else _new_id()
        record: dict[str, Any] = {"request_id": request_id}
        scope[RECORD_KEY] = record
        start = time.perf_counter()
        status = 500  # if the app raises before answering

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                access_logger.info(orjson.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                    "status": status, "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "inputs": record.get("inputs"), "tokens": record.get("tokens"),
                    "client": (scope.get("client") or [None])[0]}).decode())


class ApiKeyAuth:
    """401 in the NIM shape unless the request carries one of the keys (compared in constant time)."""

    def __init__(self, app: Any, keys: Iterable[str], public: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.public = frozenset(public)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in self.public or self._valid(scope):
            return await self.app(scope, receive, send)
        message = "missing API key: send 'Authorization: Bearer <key>'" \
            if _header(scope, b"authorization") is None else "invalid API key"
        await error_response(AuthenticationError(message))(scope, receive, send)

    def _valid(self, scope: dict) -> bool:
        scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode()
        # Every key is compared, so the time taken does not tell which one came close.
        return sum(hmac.compare_digest(given, k) for k in self.keys) > 0


def cors_options(origins: str, headers: str) -> dict[str, Any]:
    split = lambda value: [v.strip() for v in value.split(",") if v.strip()]  # noqa: E731
    return {"allow_origins": split(origins), "allow_methods": ["GET", "POST", "OPTIONS"],
            "allow_headers": split(headers), "expose_headers": ["x-request-id", "retry-after"], "max_age": 600}
