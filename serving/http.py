"""Starlette plumbing for the /v1 routes: the NIM error shape on every path, the body limit, 404 and 405.

`nim_app(routes)` wraps each handler so that a `NimError` becomes its JSON body, anything else a bare 500 (logged,
never shown), and every answer is counted in the metrics. A catch-all route answers unknown paths (404) and wrong
methods (405): BentoML mounts this app passively, so without it those would fall through to plain-text errors.
`NimErrorShape` reshapes the errors of BentoML's own routes (its batch API, /readyz, timeouts of the batcher).
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.errors import (MethodNotAllowedError, NimError, NotFoundError, PayloadTooLargeError, error_body,
                            error_type)
from serving.metrics import get_metrics

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def error_response(error: NimError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _guarded(path: str, handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await handler(request)
        except NimError as e:
            response = error_response(e)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, path)
            response = JSONResponse(error_body("internal server error", "InternalServerError"), status_code=500)
        get_metrics().observe_request(path, response.status_code, time.perf_counter() - start)
        return response

    return endpoint


def nim_app(routes: list[tuple[str, str, Handler]]) -> Starlette:
    """(method, path, handler) triples -> a Starlette app that answers every path in the NIM shape."""
    by_path: dict[str, list[str]] = {}
    for method, path, _ in routes:
        by_path.setdefault(path, []).append(method)

    async def unmatched(request: Request) -> Response:
        allowed = by_path.get(request.url.path)
        if allowed is None:
            raise NotFoundError(f"route {request.url.path} not found")
        raise MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}; allowed: "
                                    f"{', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})

    table = [Route(path, _guarded(path, handler), methods=[method]) for method, path, handler in routes]
    table.append(Route("/{path:path}", _guarded("unmatched", unmatched), methods=ALL_METHODS))
    return Starlette(routes=table)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing more than `max_bytes` (413) before reading it when declared, else as soon as it is over."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload has no Content-Length
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class NimErrorShape:
    """ASGI middleware: rewrite any error response that is not one of ours into the NIM shape.

    Only error bodies are buffered (they are small); successful responses stream through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def send_reshaped(message: dict) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _reshape(held["status"], b"".join(chunks))
            headers = [(k, v) for k, v in held["headers"] if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_reshaped)


def _reshape(status: int, body: bytes) -> bytes:
    try:
        parsed = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and "object" in parsed:  # ours: an error, or a health response's 503
        return body
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):  # BentoML's 4xx: a list of one
        parsed = parsed[0]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"]
        details = [f"{'.'.join(map(str, d.get('loc', ())))}: {d['msg']}"  # pydantic errors of BentoML's own API
                   for d in parsed.get("detail") or () if isinstance(d, dict) and d.get("msg")]
        if details:
            message += ": " + "; ".join(details)
    else:
        text = body.decode("utf-8", errors="replace").strip()
        message = text or _phrase(status)
    return json.dumps(error_body(message, error_type(status))).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
