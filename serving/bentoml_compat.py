"""The one place that reaches into BentoML's private modules, for the version pinned in pyproject.toml.

Everything else in the service uses BentoML's public API. What is here, and why:

- `release_timeout_timers`: BentoML 1.4's `TimeoutMiddleware` (armed on every route by `traffic.timeout`, which cannot
  be turned off: the setting must be positive) calls `loop.call_later(timeout, ...)` per request and never cancels
  the timer. The timer holds the request's context (its scope, its tracing span) until it fires, `traffic.timeout`
  seconds later: memory grows with the request rate times that timeout. This keeps upstream's bound (until the
  response starts) with `asyncio.timeout` on the request's own task, whose timer is cancelled when the request ends
  (and no second task is created per request). Upstream: `bentoml/_internal/server/http/traffic.py`.

`check()` runs when the service module is imported. On the pinned version it applies the workaround; on any other it
logs what is not applied and what that costs, and starts without it. tests/test_bentoml_compat.py checks that the
upstream method still arms a timer it never cancels, and that the replacement leaves none.
"""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version

PINNED = "1.4.40"
log = logging.getLogger(__name__)


def check() -> None:
    found = version("bentoml")
    if found == PINNED:
        release_timeout_timers()
        return
    log.warning("bentoml %s is installed, not %s: the fix for BentoML's request-timeout timers "
                "(serving/bentoml_compat.py) is not applied. If this version still never cancels them, memory grows "
                "with the request rate times traffic.timeout.", found, PINNED)


def release_timeout_timers() -> None:
    """Cancel the timer that BentoML's traffic timeout arms for every request once the request has answered."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    upstream = getattr(TimeoutMiddleware.__call__, "__wrapped__", TimeoutMiddleware.__call__)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False
        try:
            # Upstream's bound, on the request's own task (no second task per request): until the response starts.
            async with asyncio.timeout(self.timeout) as deadline:
                async def _send(message) -> None:
                    nonlocal started
                    if not started:
                        started = True
                        deadline.reschedule(None)
                    await send(message)

                await self.app(scope, receive, _send)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                               status_code=504)(scope, receive, send)

    __call__.__wrapped__ = upstream  # type: ignore[attr-defined]
    TimeoutMiddleware.__call__ = __call__
