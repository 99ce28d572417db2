"""Embedding servers: pick the least busy one, retry what is worth retrying, honour Retry-After.

Retried: 408, 429, 502, 503, 504 and connection errors (refused, reset, timed out), with exponential backoff and
jitter, or after the server's `Retry-After` (seconds or an HTTP date). A server that asked to wait is not sent
anything until then; the others take the retry meanwhile. Other errors raise `RequestFailed` with the server's
message. A host name that does not resolve raises `HostNotFound` at once: a misspelt or unreachable name does not
start resolving in the seconds a backoff waits, and retrying it would only delay the error.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import email.utils
import itertools
import random
import socket
import time
from typing import Any, Sequence

import httpx
import numpy as np

RETRYABLE = frozenset({408, 429, 502, 503, 504})


class RequestFailed(Exception):
    def __init__(self, status: int | None, message: str, url: str = ""):
        super().__init__(f"{status or 'no response'}: {message}" + (f" ({url})" if url else ""))
        self.status = status
        self.message = message
        self.url = url


class HostNotFound(RequestFailed):
    """The server's host name does not resolve (DNS): not retried."""


@dataclasses.dataclass
class Server:
    url: str  # base URL, without /v1
    in_flight: int = 0
    # By request path ("/v1/embeddings", "/v1/models"), so that a report on one path adds up.
    requests: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # answered
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # retryable failures
    not_before: float = 0.0  # monotonic time before which it asked not to be called


class ServerPool:
    """Least-busy choice among servers (round-robin among equals), with retries.

    `concurrency` bounds the requests in flight over all servers together.
    """

    def __init__(self, urls: Sequence[str], *, concurrency: int = 4, timeout_s: float = 300.0, max_retries: int = 8,
                 backoff_s: float = 0.5, max_backoff_s: float = 60.0, api_key: str | None = None):
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.servers = [Server(_base_url(u)) for u in urls]
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retries_by_path: collections.Counter[str] = collections.Counter()
        self._slots = asyncio.Semaphore(concurrency)
        self._turn = itertools.count()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers,
            limits=httpx.Limits(max_connections=concurrency + len(self.servers), max_keepalive_connections=concurrency))

    @property
    def retries(self) -> int:
        return sum(self.retries_by_path.values())

    @property
    def requests_by_path(self) -> collections.Counter[str]:
        """Requests answered (any status), over all servers."""
        return sum((s.requests for s in self.servers), collections.Counter())

    async def __aenter__(self) -> ServerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- choosing a server ----------------------------------------------------------------------------------------
    def _pick(self, avoid: Server | None) -> tuple[Server | None, float]:
        """(the least busy server that may be called now, 0) or (None, seconds until one may)."""
        now = time.monotonic()
        ready = [s for s in self.servers if s.not_before <= now]
        if not ready:
            return None, min(s.not_before for s in self.servers) - now
        if avoid is not None and len(ready) > 1:
            ready = [s for s in ready if s is not avoid]
        turn = next(self._turn)
        n = len(self.servers)
        return min(ready, key=lambda s: (s.in_flight, (self.servers.index(s) - turn) % n)), 0.0

    async def _server(self, avoid: Server | None) -> Server:
        while True:
            server, wait = self._pick(avoid)
            if server is not None:
                return server
            await asyncio.sleep(wait)

    # ---- requests -------------------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """The JSON answer of the first server that answers 200, retrying transient failures."""
        last: RequestFailed | None = None
        server: Server | None = None
        async with self._slots:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.retries_by_path[path] += 1
                server = await self._server(avoid=server)
                server.in_flight += 1
                try:
                    response = await self._http.request(method, server.url + path, json=json)
                except httpx.TransportError as e:
                    if _unresolvable(e):
                        raise HostNotFound(None, f"cannot resolve the server's host name ({e}): check the URL",
                                           server.url) from e
                    server.errors[path] += 1
                    last = RequestFailed(None, f"{type(e).__name__}: {e}", server.url)
                    server.not_before = time.monotonic() + self._backoff(attempt)
                    continue
                finally:
                    server.in_flight -= 1
                server.requests[path] += 1
                if response.status_code == 200:
                    return response.json()
                failure = RequestFailed(response.status_code, _message(response), server.url)
                if response.status_code not in RETRYABLE:
                    raise failure
                server.errors[path] += 1
                last = failure
                delay = _retry_after(response)
                server.not_before = time.monotonic() + min(
                    delay if delay is not None else self._backoff(attempt), self.max_backoff_s)
        assert last is not None
        raise RequestFailed(last.status, f"gave up after {self.max_retries + 1} attempts: {last.message}", last.url)

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    async def model_id(self) -> str:
        """The model the first server serves (GET /v1/models)."""
        models = await self.request("GET", "/v1/models")
        return models["data"][0]["id"]

    async def embed(self, inputs: list[str], *, model: str, input_type: str, modality: list[str] | None = None,
                    truncate: str = "END") -> tuple[np.ndarray, int]:
        """float32 [n, D] L2-normalised vectors (base64 on the wire: exact and 4x smaller than JSON floats), and
        the tokens the server counted."""
        body: dict[str, Any] = {"model": model, "input": inputs, "input_type": input_type, "truncate": truncate,
                                "encoding_format": "base64", "embedding_type": "float"}
        if modality is not None:
            body["modality"] = modality
        answer = await self.request("POST", "/v1/embeddings", json=body)
        data = sorted(answer["data"], key=lambda d: d["index"])
        if len(data) != len(inputs):
            raise RequestFailed(200, f"{len(data)} embeddings for {len(inputs)} inputs")
        vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        return vectors.astype(np.float32, copy=False), int(answer.get("usage", {}).get("total_tokens", 0))


def _unresolvable(error: BaseException) -> bool:
    """Whether a transport error comes from name resolution (httpx wraps httpcore's error, which wraps the
    socket.gaierror of getaddrinfo)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, socket.gaierror):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body.get("error") or body)[:2000]
    return str(body)[:2000]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
