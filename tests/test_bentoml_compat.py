"""serving/bentoml_compat.py: the one workaround for BentoML's internals, and its version check."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging

import pytest
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from serving import bentoml_compat


def _app(delay_s: float = 0.0):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        await asyncio.sleep(delay_s)
        await JSONResponse({"ok": True})(scope, receive, send)
    return app


def _long_timers() -> int:
    """Timers armed for a minute or more that are still pending."""
    gc.collect()
    loops = {o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()}
    now = {loop: loop.time() for loop in loops}
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled()
               and any(o.when() - t > 60 for t in now.values()))


def test_upstream_still_arms_a_timer_per_request_that_it_never_cancels():
    """If this fails, BentoML changed the middleware: re-read it, and drop the workaround if it is fixed."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_compat.check()
    upstream = inspect.getsource(TimeoutMiddleware.__call__.__wrapped__)
    assert "loop.call_later(self.timeout, self._set_timer_out, waiter)" in upstream
    assert ".cancel()" not in upstream.replace("fut.cancel()", "")


def test_no_timer_outlives_its_request():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_compat.check()
    with TestClient(TimeoutMiddleware(_app(), timeout=300)) as client:
        for _ in range(5):
            assert client.get("/").json() == {"ok": True}
        assert _long_timers() == 0


def test_the_upstream_middleware_leaks_the_timers_the_fix_releases():
    """The same check against BentoML's own method: it must see the leak, or the test above proves nothing."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_compat.check()
    patched = TimeoutMiddleware.__call__
    TimeoutMiddleware.__call__ = patched.__wrapped__
    try:
        with TestClient(TimeoutMiddleware(_app(), timeout=300)) as client:
            for _ in range(3):
                client.get("/")
            assert _long_timers() >= 3
    finally:
        TimeoutMiddleware.__call__ = patched


def test_a_request_that_starts_no_answer_in_time_gets_bentomls_504():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_compat.check()
    with TestClient(TimeoutMiddleware(_app(delay_s=1.0), timeout=0.2)) as client:
        response = client.get("/")
    assert response.status_code == 504 and "0.2 seconds" in response.json()["error"]


def test_another_bentoml_version_is_reported_and_left_alone(monkeypatch, caplog):
    applied = []
    monkeypatch.setattr(bentoml_compat, "version", lambda name: "9.9.9")
    monkeypatch.setattr(bentoml_compat, "release_timeout_timers", lambda: applied.append(True))
    with caplog.at_level(logging.WARNING, logger=bentoml_compat.__name__):
        bentoml_compat.check()
    assert not applied
    assert "bentoml 9.9.9 is installed, not 1.4.40" in caplog.text


@pytest.mark.parametrize("module", ["service.py", "serving", "engine", "model"])
def test_no_other_module_imports_bentoml_internals(module):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = [root / module] if module.endswith(".py") else sorted((root / module).rglob("*.py"))
    for path in paths:
        if path.name == "bentoml_compat.py":
            continue
        text = path.read_text()
        for private in ("bentoml._internal", "_bentoml_impl", "_bentoml_sdk"):
            assert private not in text, f"{path.relative_to(root)} uses {private}"
