"""Starlette plumbing for the /v1 routes: the NIM error shape on every path, the body limit, 404 and 405.

`nim_app(routes)` wraps each handler so that a `NimError` becomes its JSON body, anything else a bare 500 (logged,
never shown), and every answer is counted in the metrics. A catch-all route answers unknown paths (404) and wrong
methods (405): BentoML mounts this app passively, so without it those would fall through to plain-text errors.
`NimRoutes` answers those routes as an ASGI middleware, ahead of BentoML's request context, exception handling and
router, which the /v1 routes do not use: a short request pays for a dictionary lookup instead. What it does not
answer (a wrong method, an unknown path, BentoML's own routes) goes on to the mounted app and BentoML as before.
`NimErrorShape` reshapes the errors of BentoML's own routes (its batch API, /readyz, timeouts of the batcher).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from serving.errors import (ClientClosedRequest, MethodNotAllowedError, NimError, NotFoundError,
                            PayloadTooLargeError, error_body, error_type)
from serving.metrics import get_metrics

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")
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
    table.append(_Unmatched("/{path:path}", _guarded("unmatched", unmatched), methods=ALL_METHODS))
    return Starlette(routes=table)


class NimRoutes:
    """ASGI middleware: the (method, path, handler) routes answered here, in the NIM shape (as `nim_app` does)."""

    def __init__(self, app: Any, routes: list[tuple[str, str, Handler]]) -> None:
        self.app = app
        self.table: dict[tuple[str, str], Handler] = {(method, path): _guarded(path, handler)
                                                      for method, path, handler in routes}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        endpoint = self.table.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


# BentoML's own pages, registered after the mounted app: a catch-all that matched them would hide them.
BENTOML_PAGES = ("/", "/docs.json", "/schema.json")
BENTOML_PREFIXES = ("/static_content/", "/assets/")


class _Unmatched(Route):
    """The catch-all (404/405 in the NIM shape), except for BentoML's Swagger UI and its OpenAPI document."""

    def matches(self, scope: dict) -> tuple[Match, dict]:
        path = scope.get("path", "")
        if scope.get("method") in ("GET", "HEAD") and (path in BENTOML_PAGES or path.startswith(BENTOML_PREFIXES)):
            return Match.NONE, {}
        return super().matches(scope)


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


async def discard_body(request: Request, max_bytes: int) -> None:
    """Read and drop a body that will not be used, up to `max_bytes`: a server that answers (429) and closes with
    the body unread makes the kernel reset the connection, and the client may see the reset instead of the answer.
    Reading a small body costs little; past `max_bytes` the connection is closed anyway."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return


# How long a request runs before it starts listening for its client hanging up. Most requests are answered sooner,
# and then pay for no listener at all (a task per request is a measurable share of a short request's cost).
LISTEN_AFTER_S = 0.02


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (after the body was read), cancelling it with a 499 if the client hangs up first.

    Listens for the server's `http.disconnect` message instead of polling: nothing else reads from `receive` once
    the body is in, and the wait costs nothing while the request is queued. The work runs on the request's own task;
    a listener task starts only if the work is still running after LISTEN_AFTER_S, and cancels the work when the
    client is gone.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    gone = False
    listener: asyncio.Task | None = None

    async def listen() -> None:
        nonlocal gone
        await _until_disconnected(request.receive)
        gone = True
        task.cancel()

    def start_listening() -> None:
        nonlocal listener
        listener = loop.create_task(listen())

    timer = loop.call_later(LISTEN_AFTER_S, start_listening)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientClosedRequest("the client closed the connection before the answer was ready") from None
    finally:
        timer.cancel()
        if listener is not None:
            listener.cancel()


async def _until_disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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
