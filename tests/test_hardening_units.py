"""Hardening without a server: admission control, the access middlewares, text caps, image modes, checkpoint
preflight, the OpenAPI document, and the engine's retry of a failed forward pass."""

from __future__ import annotations

import io
import json
import logging
import struct
import asyncio
import time

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from serving import openapi
from serving.access import ApiKeyAuth, RequestLog, annotate
from serving.admission import Admission, LoopLag
from serving.errors import TooManyRequestsError
from serving.http import nim_app
from serving.prepare import CUT_MARGIN_TOKENS, cap_text, chars_per_token
from serving.schemas import BatchItem
from serving.preflight import CheckpointError, check_checkpoint, preflight
from serving.settings import Settings


# ---- admission control -------------------------------------------------------------------------------------------------
def test_admission_counts_inputs_and_tokens_and_sheds_with_retry_after():
    shed = []
    a = Admission(max_inputs=10, max_tokens=100, retry_after_s=2, on_shed=shed.append)
    first = a.enter()
    first.admit(6)
    first.charge(60)
    late = a.enter()
    with pytest.raises(TooManyRequestsError) as e:
        late.admit(5)  # 6 + 5 inputs > 10
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}
    late.release()
    second = a.enter()
    second.admit(4)
    with pytest.raises(TooManyRequestsError):
        second.charge(41)  # 60 + 41 tokens > 100
    second.release()
    assert (a.inputs, a.tokens, a.requests) == (6, 60, 1)
    third = a.enter()
    third.admit(4)
    third.charge(40)
    with pytest.raises(TooManyRequestsError):
        a.enter()  # full: refused before the body is read
    first.release()
    first.release()  # idempotent
    third.release()
    assert (a.inputs, a.tokens, a.requests) == (0, 0, 0)
    assert shed == ["inputs", "tokens", "full"]


def test_requests_not_yet_parsed_hold_room():
    """Each request holds one input from the moment it is let in: under a burst, the requests still being read and
    parsed fill the worker, and the next ones are refused before their bodies are read instead of queueing for the
    parser only to be refused after it."""
    a = Admission(max_inputs=3, max_tokens=100)
    tickets = [a.enter() for _ in range(3)]  # three bodies being read, none parsed yet
    assert (a.inputs, a.requests) == (3, 3)
    with pytest.raises(TooManyRequestsError):
        a.enter()
    tickets[0].admit(1)  # parsed: one input, as held
    tickets[1].release()  # this one failed to parse
    fourth = a.enter()
    with pytest.raises(TooManyRequestsError):
        fourth.admit(2)  # 2 others + 2 > 3
    fourth.release()
    tickets[2].admit(2)  # its own placeholder is not counted against it
    assert (a.inputs, a.requests) == (3, 2)
    for t in tickets:
        t.release()
    assert (a.inputs, a.tokens, a.requests) == (0, 0, 0)


def test_a_late_event_loop_sheds_new_requests_above_the_floor():
    class Lag:
        seconds = 0.0

        def late(self) -> float:
            return self.seconds

    lag, shed = Lag(), []
    a = Admission(max_inputs=100, max_tokens=10_000, max_lag_s=0.025, busy_floor=300, lag=lag, on_shed=shed.append)
    held = [a.enter() for _ in range(3)]  # on time: admitted
    for ticket in held:
        ticket.charge(100)
    lag.seconds = 0.030
    with pytest.raises(TooManyRequestsError) as e:
        a.enter()  # late, and the worker holds its floor of tokens: refused before the body is read
    assert e.value.status == 429 and shed == ["busy"]
    held.pop().release()
    a.enter().release()  # late, but under the floor: a worker that only refuses still takes work
    lag.seconds = 0.020
    a.enter().release()  # back on time
    never = Admission(max_inputs=100, max_tokens=10_000, max_lag_s=0.0, busy_floor=0, lag=lag)
    lag.seconds = 10.0
    never.enter().release()  # max_lag_s 0: lag is never a reason
    assert shed == ["busy"]


def test_loop_lag_sees_a_stalled_loop_before_its_timer_runs():
    lag = LoopLag(interval_s=0.005)

    async def main() -> tuple[float, float, float]:
        first = lag.late()  # starts the timer on this loop
        await asyncio.sleep(0.03)
        on_time = lag.late()
        time.sleep(0.1)  # the loop is stuck in this callback
        stalled = lag.late()
        await asyncio.sleep(0.03)  # the timer fires late once, then runs on time again
        return first, on_time, stalled

    first, on_time, stalled = asyncio.run(main())
    assert first == 0.0 and on_time < 0.05 and stalled >= 0.09
    assert asyncio.run(_late_on_a_new_loop(lag)) == 0.0  # a new loop: starts again from nothing


async def _late_on_a_new_loop(lag: LoopLag) -> float:
    return lag.late()


def test_a_request_larger_than_the_limits_runs_alone():
    a = Admission(max_inputs=4, max_tokens=10)
    with a.enter() as big:  # nothing else in flight: admitted, or it could never run
        big.admit(100)
        big.charge(1000)
        with pytest.raises(TooManyRequestsError):
            a.enter()
    assert a.inputs == 0 and a.tokens == 0 and a.requests == 0


def test_the_queue_wait_cannot_be_set_by_a_client():
    """A direct BentoML client once sent `submitted_at: -1e308` (the fuzzer did) and the queue-wait histogram's sum
    became +inf for good: the wait is measured by the engine's queue, never taken from a field of the item."""
    assert {"submitted_at", "ticket"}.isdisjoint(BatchItem.model_fields)
    assert BatchItem.model_validate({"submitted_at": -1e308, "token_ids": [1]}).model_dump(exclude_none=True) == {
        "token_ids": [1], "input_type": "passage"}


def test_default_limits_come_from_the_engine_budget():
    assert Settings.from_env({}).inflight_limits(max_rows=64, max_batch_tokens=8192) == (1024, 131072)
    s = Settings.from_env({"EMBED_MAX_INFLIGHT_INPUTS": "7", "EMBED_MAX_INFLIGHT_TOKENS": "99"})
    assert s.inflight_limits(64, 8192) == (7, 99)


# ---- API keys, request ids, access log ---------------------------------------------------------------------------------
def test_api_keys_from_the_environment_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n  spaced-key  \n")
    s = Settings.from_env({"EMBED_API_KEYS": "a, b,,a", "EMBED_API_KEYS_FILE": str(keys)})
    assert s.keys() == ("a", "b", "file-key", "spaced-key")
    assert Settings.from_env({}).keys() == ()
    assert "a, b" not in repr(s)  # keys never appear in a repr (logs)
    with pytest.raises(ValueError, match="cannot be read"):
        Settings.from_env({"EMBED_API_KEYS_FILE": str(tmp_path / "missing")}).keys()
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="hold no key"):  # asked for auth, given no key: never serve everyone
        Settings.from_env({"EMBED_API_KEYS_FILE": str(tmp_path / "empty")}).keys()


@pytest.fixture
def guarded_app():
    async def embeddings(request: Request):
        annotate(request.scope, inputs=3, tokens=42)
        return JSONResponse({"ok": True})

    async def live(request: Request):
        return JSONResponse({"live": True})

    app = nim_app([("POST", "/v1/embeddings", embeddings), ("GET", "/v1/health/live", live)])
    return RequestLog(ApiKeyAuth(app, keys=["k1", "k2"], public=["/v1/health/live"]))


def test_api_key_auth(guarded_app):
    client = TestClient(guarded_app)
    missing = client.post("/v1/embeddings")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {"object": "error", "message": "missing API key: send 'Authorization: Bearer <key>'",
                              "type": "AuthenticationError"}
    for header in ("Bearer k3", "Basic k1", "Bearer", "k1", "Bearer k1k2"):
        response = client.post("/v1/embeddings", headers={"Authorization": header})
        assert response.status_code == 401 and response.json()["message"] == "invalid API key", header
    assert client.post("/v1/embeddings", headers={"Authorization": "Bearer k2"}).json() == {"ok": True}
    assert client.post("/v1/embeddings", headers={"Authorization": "bearer  k1 "}).status_code == 200
    assert client.get("/v1/health/live").status_code == 200  # public
    assert client.post("/v1/embeddings", headers={"x-nim-internal": "anything"}).status_code == 401  # no bypass


def test_request_ids_and_json_access_log(guarded_app, caplog):
    client = TestClient(guarded_app)
    logger = logging.getLogger("serving.access")
    logger.addHandler(caplog.handler)
    try:
        given = client.post("/v1/embeddings", headers={"Authorization": "Bearer k1", "x-request-id": "abc-123"})
        generated = client.post("/v1/embeddings", headers={"Authorization": "Bearer k1"})
        forged = client.get("/v1/health/live", headers={"x-request-id": 'evil"\n{"status": 200}'})
        client.post("/v1/embeddings", headers={"Authorization": "Bearer k9"})
    finally:
        logger.removeHandler(caplog.handler)
    assert given.headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) == 32
    assert forged.headers["x-request-id"] != 'evil"\n{"status": 200}'  # replaced, not logged as given
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serving.access"]
    assert len(lines) == 4
    first = lines[0]
    assert set(first) == {"time", "request_id", "method", "path", "status", "duration_ms", "inputs", "tokens",
                          "client"}
    assert (first["request_id"], first["method"], first["path"], first["status"], first["inputs"],
            first["tokens"]) == ("abc-123", "POST", "/v1/embeddings", 200, 3, 42)
    assert lines[1]["request_id"] == generated.headers["x-request-id"]
    assert lines[3]["status"] == 401 and lines[3]["inputs"] is None
    assert "k9" not in caplog.text and "Bearer" not in caplog.text  # no keys, no headers


# ---- texts are capped by characters before tokenising ------------------------------------------------------------------
def test_texts_are_capped_before_tokenising(tiny_embedder):
    prompter = tiny_embedder.prompter
    per_token = chars_per_token(prompter.tokenizer)
    assert 1 <= per_token <= 256
    limit = 64
    huge = "word " * 20_000_000  # 100 MB
    seen = []
    real = prompter.tokenizer

    class Spy:  # the real tokenizer, recording how long a text it is given
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, text, *args, **kwargs):
            seen.append(len(text))
            return real.encode(text, *args, **kwargs)

    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"exceeds maximum allowed token size {limit}: 100000000 characters"):
        cap_text(huge, limit, "NONE", per_token)
    capped = cap_text(huge, limit, "END", per_token)
    assert len(capped) == (limit + CUT_MARGIN_TOKENS) * per_token and huge.startswith(capped)
    assert time.perf_counter() - start < 1.0
    # Truncation keeps exactly the tokens a full tokenisation would keep.
    body = "".join(f"token{i} and, some;  punctuation!\n" for i in range(400))
    for offset in range(0, 12):  # cuts falling inside words, on spaces, on punctuation, on a newline
        for text in (body[offset:], " " + body[offset:], "!" + body[offset:]):
            for truncate in ("END", "START"):
                capped = cap_text(text, limit, truncate, per_token)
                assert len(capped) < len(text)
                np.testing.assert_array_equal(prompter.encode(capped, 0, "passage", truncate, limit),
                                              prompter.encode(text, 0, "passage", truncate, limit))
    assert cap_text("short", limit, "NONE", per_token) == "short"
    try:
        prompter.tokenizer = Spy()
        from serving.prepare import prepare_item
        from serving.inputs import ParsedInput

        settings = Settings.from_env({"EMBED_MAX_TOKENS_TEXT": str(limit)})
        prepare_item(ParsedInput("text", huge, None), "query", "END", tiny_embedder, settings)
    finally:
        prompter.tokenizer = real
    assert seen and max(seen) < (limit + CUT_MARGIN_TOKENS + 1) * per_token  # never the 100 MB


# ---- image modes become the RGB the reference processor makes: Pillow's convert("RGB") ------------------------------
def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_image_modes_convert_as_the_reference_processor_does():
    from model.processor import load_image

    def pixel(source):
        return tuple(int(v) for v in np.asarray(load_image(source))[0, 0])

    sixteen = _encoded(Image.fromarray(np.full((4, 4), 32896, np.uint16)), "PNG")  # mid grey in 16 bits
    assert pixel(sixteen) == (255, 255, 255)  # clipped at 255, as Pillow and so the reference do
    assert pixel(_encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")) == (0, 0, 0)  # alpha dropped
    assert pixel(_encoded(Image.new("LA", (4, 4), (0, 128)), "PNG")) == (0, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert pixel(_encoded(palette, "PNG", transparency=1)) == (255, 0, 0)  # transparency ignored
    cmyk = _encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    assert np.allclose(pixel(cmyk), (255, 0, 0), atol=8)
    assert pixel(_encoded(Image.new("1", (4, 4), 1), "PNG")) == (255, 255, 255)
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert pixel(floats) == tuple(np.asarray(floats.convert("RGB"))[0, 0])
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    animated = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(animated)).n_frames == 2
    assert pixel(animated) == (255, 0, 0)  # the first frame
    with pytest.raises(Image.UnidentifiedImageError):  # the formats the caller allows, no other decoder
        load_image(_encoded(frames[0], "BMP"), formats=("PNG",))


# ---- a failed forward pass is retried in halves ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_engine(tiny_embedder):
    from engine import Engine, EngineConfig

    engine = Engine(tiny_embedder, EngineConfig(max_length=64, max_batch_tokens=512, max_rows=8, max_tiles=8))
    yield engine
    engine.close()


def test_a_failed_pass_is_retried_in_halves_and_fails_only_a_bad_input(small_engine, monkeypatch):
    from engine import EngineItem

    items = [EngineItem(text=f"passage number {i}", input_type="passage") for i in range(6)]
    expected = small_engine.embed(items)
    assert all(isinstance(v, np.ndarray) for v in expected)
    dispatch = small_engine._dispatch
    calls = []

    def out_of_memory_above_two(image, members):  # a device that cannot fit more than two rows
        calls.append(len(members))
        if len(members) > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return dispatch(image, members)

    monkeypatch.setattr(small_engine, "_dispatch", out_of_memory_above_two)
    got = small_engine.embed(items)
    assert calls[0] == 6 and max(calls[1:]) <= 3
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)

    bad_ids = small_engine.embedder.prompter.encode(items[4].text, 0, "passage").tolist()

    class LateFailure:  # an asynchronous device error surfaces when the result is read
        def __array__(self, *args, **kwargs):
            raise RuntimeError("INTERNAL: device halted")

    def one_bad_input(image, members):  # any pass holding input 4 fails, however small
        if any(m.token_ids.tolist() == bad_ids for m in members):
            return LateFailure(), ("text", 1, 16, len(members), 1, 0)
        return dispatch(image, members)

    monkeypatch.setattr(small_engine, "_dispatch", one_bad_input)
    got = small_engine.embed(items)
    assert isinstance(got[4], RuntimeError) and "device halted" in str(got[4])
    for i in (0, 1, 2, 3, 5):
        np.testing.assert_allclose(got[i], expected[i], atol=1e-5)
    monkeypatch.undo()
    recovered = small_engine.embed(items)  # and the engine carries on
    for a, b in zip(recovered, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ---- a checkpoint that cannot load stops the server before it starts ---------------------------------------------------
def test_preflight_finds_missing_and_corrupt_checkpoints(tiny_checkpoint, tmp_path):
    import shutil

    check_checkpoint(str(tiny_checkpoint))  # the real thing passes
    check_checkpoint("nvidia/llama-nemotron-embed-vl-1b-v2")  # a Hub id is the worker's business
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: .* the file is truncated or corrupt"):
        check_checkpoint(str(broken))
    weights.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        check_checkpoint(str(broken))
    weights.write_bytes(data)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_checkpoint(str(broken))
    (broken / "config.json").unlink()
    with pytest.raises(SystemExit, match=r"FATAL: cannot serve EMBED_MODEL=.*broken: config.json is missing"):
        preflight(str(broken))


# ---- the OpenAPI document ----------------------------------------------------------------------------------------------
def test_openapi_documents_the_nim_routes_and_merges_into_bentoml():
    doc = openapi.document()
    assert {"/v1/embeddings", "/v1/models", "/v1/health/ready", "/v1/health/live", "/v1/metrics", "/v1/metadata",
            "/v1/manifest", "/v1/license", "/v1/version"} <= set(doc["paths"])
    body = doc["components"]["schemas"]["EmbeddingRequest"]
    assert body["required"] == ["model", "input"] and "dimensions" in body["properties"]
    assert "securitySchemes" not in doc["components"]
    secured = openapi.document(auth=True)
    assert secured["paths"]["/v1/embeddings"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in secured["paths"]["/v1/health/live"]["get"]
    merged = openapi.merge({"openapi": "3.0.2", "paths": {"/embed_batch": {}}, "components": {"schemas": {"A": {}}}},
                           doc)
    assert "/embed_batch" in merged["paths"] and "/v1/embeddings" in merged["paths"]
    assert {"A", "EmbeddingRequest"} <= set(merged["components"]["schemas"])


