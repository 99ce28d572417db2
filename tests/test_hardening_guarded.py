"""Overload, timeouts, disconnects and access control on a second server (tests/service_fixtures.py, GUARDED_ENV):
API keys from the environment and a file, CORS for one origin, at most 4 inputs in flight, a 1 s request timeout
and a 1.5 s delay in every batch, so that every embedding request is still in flight after a second."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.service_fixtures import API_KEYS, FILE_KEY, MODEL_ID

BODY = {"model": MODEL_ID, "input": ["one input"]}
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


@pytest.fixture
def guarded(guarded_server):
    """The guarded server once the previous test's requests are over (nothing in flight), and its log on failure."""
    offset = guarded_server.log.stat().st_size
    with httpx.Client(base_url=guarded_server.url, timeout=30) as c:
        deadline = time.monotonic() + 10
        while metric(c, "nim_inflight_inputs") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield guarded_server, c
    print(guarded_server.log_text(offset)[-10000:])


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/v1/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def assert_nim(response: httpx.Response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"object", "message", "type"} and body["object"] == "error" and body["type"] == type_
    return body


def test_api_keys_guard_everything_but_health_and_metrics(guarded):
    _, c = guarded
    for method, path in [("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/v1/metadata"),
                         ("POST", "/embed_batch"), ("GET", "/docs.json"), ("GET", "/v1/openapi.json")]:
        response = c.request(method, path, json=BODY)
        body = assert_nim(response, 401, "AuthenticationError")
        assert response.headers["www-authenticate"] == "Bearer" and "API key" in body["message"]
    assert_nim(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "AuthenticationError")
    for path in ("/v1/health/live", "/v1/health/ready", "/v1/metrics", "/livez", "/readyz"):
        assert c.get(path).status_code == 200, path
    for key in (*API_KEYS, FILE_KEY):
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
    assert "bearerAuth" in c.get("/v1/openapi.json", headers=AUTH).json()["components"]["securitySchemes"]


def test_the_request_timeout_answers_504_in_the_nim_shape(guarded):
    _, c = guarded
    start = time.perf_counter()
    response = c.post("/v1/embeddings", json=BODY, headers=AUTH)  # past the key
    elapsed = time.perf_counter() - start
    assert_nim(response, 504, "GatewayTimeoutError")
    assert response.json()["message"] == "the request took longer than 1 s"
    assert 0.9 < elapsed < 5, elapsed


def test_cors_for_the_configured_origin_only(guarded):
    _, c = guarded
    preflight = c.options("/v1/embeddings", headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # answered before the key is asked for: browsers send none here
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    refused = c.options("/v1/embeddings", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert_nim(refused, 400, "BadRequestError")
    simple = c.get("/v1/health/live", headers={"Origin": "https://app.example"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in simple.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in c.get("/v1/health/live", headers={"Origin": "https://evil.example"}
                                                      ).headers


def test_overload_is_shed_at_once_with_429_and_probes_stay_quick(guarded):
    server, c = guarded
    shed_before = metric(c, "nim_shed_requests_total")

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=AUTH) as ac:
            async def one(i: int):
                start = time.perf_counter()
                response = await ac.post("/v1/embeddings", json={**BODY, "input": [f"input {i}"]})
                return response, time.perf_counter() - start

            async def probe():
                await asyncio.sleep(0.3)  # while the admitted requests are in flight
                start = time.perf_counter()
                live = await ac.get("/v1/health/live")
                return live.status_code, time.perf_counter() - start

            async def probe_port():  # the probes' own port, answered by a thread of its own
                await asyncio.sleep(0.3)
                port = server.env["EMBED_HEALTH_PORT"]
                return [(await ac.get(f"http://127.0.0.1:{port}{path}")) for path in ("/v1/health/live",
                                                                                      "/v1/health/ready")]

            return await asyncio.gather(asyncio.gather(*[one(i) for i in range(16)]), probe(), probe_port())

    answers, (live_status, live_seconds), own_port = asyncio.run(flood())
    assert [r.status_code for r in own_port] == [200, 200]
    assert own_port[0].json() == {"object": "health.response", "message": "live", "live": True}
    assert own_port[1].json() == {"object": "health.response", "message": "ready", "ready": True}
    statuses = [r.status_code for r, _ in answers]
    # 4 inputs admitted, at most (answered, or 504 when their batch came after the 1 s timeout); the rest shed
    assert statuses.count(429) >= 12 and set(statuses) <= {200, 429, 504}, statuses
    for response, seconds in answers:
        if response.status_code == 429:
            assert_nim(response, 429, "TooManyRequestsError")
            assert response.headers["retry-after"] == "1"
            assert seconds < 0.5, seconds  # shed at once, not after queueing
    assert live_status == 200 and live_seconds < 0.5
    assert metric(c, "nim_shed_requests_total") - shed_before == statuses.count(429)


def test_a_client_that_hangs_up_is_dropped_before_the_device(guarded):
    server, c = guarded
    offset = server.log.stat().st_size
    abandoned = metric(c, "nim_abandoned_inputs_total")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # earlier tests' timed-out items may still sit in a sleeping batch
        time.sleep(1.6)  # longer than a batch
        settled, abandoned = abandoned, metric(c, "nim_abandoned_inputs_total")
        if settled == abandoned:
            break
    passes = metric(c, "nim_forward_passes_total")
    with pytest.raises(httpx.ReadTimeout):  # hangs up after 0.3 s, long before the 1 s timeout
        httpx.post(f"{server.url}/v1/embeddings", json={**BODY, "input": ["a", "b", "c"]},
                   headers={**AUTH, "x-request-id": "hangs-up"}, timeout=0.3)
    time.sleep(2.5)  # the batch it was queued in has run by now
    lines = [json.loads(line) for line in server.log_text(offset).splitlines() if line.startswith('{"time"')]
    assert next(line for line in lines if line["request_id"] == "hangs-up")["status"] == 499
    assert metric(c, "nim_abandoned_inputs_total") - abandoned == 3  # its 3 inputs were skipped in the batch
    assert metric(c, "nim_forward_passes_total") == passes  # and never reached the device
    assert metric(c, "nim_inflight_inputs") == 0
