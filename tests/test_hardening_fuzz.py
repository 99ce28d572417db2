"""Fuzzing the live server: schemathesis from the service's own OpenAPI (/docs.json: BentoML's routes with
the NIM routes merged in), then hypothesis-made request bodies (random JSON shapes, random field values, random data
URLs). Whatever arrives: no 5xx, every error in the NIM shape, and the server still serves afterwards.
Bounded (FUZZ_EXAMPLES) to about a minute; raise it for a longer hunt: NIM_FUZZ_EXAMPLES=5000 pytest ..."""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from PIL import Image

from tests.service_fixtures import MODEL_ID, png_header_only

FUZZ_EXAMPLES = int(os.environ.get("NIM_FUZZ_EXAMPLES", "1500"))
SCHEMA_EXAMPLES = max(5, FUZZ_EXAMPLES // 10)
RUN = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
COUNT: dict[str, int] = {}  # cases sent, by source, reported at the end of the module


def check(response_status: int, content_type: str, text: str) -> None:
    assert response_status < 500, text[:500]
    if response_status >= 400 and content_type.startswith("application/json"):
        body = json.loads(text)
        assert set(body) == {"object", "message", "type"} and body["object"] == "error", body
        assert "Traceback" not in body["message"]


# ---- schemathesis: every operation of the served OpenAPI ---------------------------------------------------------------
def test_schemathesis_finds_no_server_error(nim_server):
    """Every operation BentoML's /docs.json describes (ours merged in), with valid and invalid data.
    (Driven by hand: schemathesis' pytest plugin does not load lazily under pytest 9.)"""
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{nim_server.url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/embeddings", "/embed_batch", "/v1/models"} <= {op.path for op in operations}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(RUN, max_examples=SCHEMA_EXAMPLES)
            def fuzz(case):
                response = case.call(base_url=nim_server.url, timeout=60)
                COUNT["schemathesis"] = COUNT.get("schemathesis", 0) + 1
                kind = response.headers.get("content-type") or [""]
                check(response.status_code, kind[0] if isinstance(kind, list) else kind, response.text)

            try:
                fuzz()
            except Unsatisfiable:  # an operation without parameters or body has no invalid form
                assert mode is GenerationMode.NEGATIVE


# ---- hypothesis: bodies no schema would write --------------------------------------------------------------------------
def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
payloads = st.one_of(
    st.binary(max_size=64),  # random bytes
    st.builds(png_header_only, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),  # any declared size
    st.builds(_png, st.integers(1, 96), st.integers(1, 96), st.integers(0, 1000)),  # real small images
    st.builds(lambda raw, cut: raw[:cut], st.builds(_png, st.just(40), st.just(30), st.just(0)),
              st.integers(0, 400)),  # truncated
)
data_urls = st.one_of(
    st.builds(lambda kind, raw: f"data:image/{kind};base64,{base64.b64encode(raw).decode()}",
              st.sampled_from(["png", "jpeg", "gif", "webp", "bmp", "tiff", "jpg", "svg+xml", "x"]), payloads),
    st.builds(lambda kind, junk: f"data:image/{kind};base64,{junk}", st.sampled_from(["png", "gif"]),
              st.text(max_size=40)),  # not base64
    st.builds(lambda url: f'<img src="{url}"/>', st.sampled_from(["http://127.0.0.1:9/x.png", "file:///etc/passwd"])),
)
texts = st.text(max_size=60) | st.builds(lambda t, u: f"{t}\n{u}", st.text(max_size=20), data_urls) | data_urls
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"model": st.sampled_from([MODEL_ID, MODEL_ID + "-query", MODEL_ID + "-passage", "other"])
         | st.text(max_size=8),
         "input": texts | st.lists(texts, max_size=4) | json_values},
        optional={
            "input_type": st.sampled_from(["query", "passage", "QUERY", ""]) | json_values,
            "modality": st.sampled_from(["text", "image", "text_image"]) | st.lists(
                st.sampled_from(["text", "image", "text_image", "bogus"]), max_size=4) | json_values,
            "embedding_type": st.sampled_from(["float", "int8", "uint8", "binary", "ubinary", "half"]) | json_values,
            "encoding_format": st.sampled_from(["float", "base64", None, "hex"]),
            "dimensions": st.sampled_from([4, 8, 16, 64, 128, 0, -1, 10**30]) | json_values,
            "truncate": st.sampled_from(["NONE", "START", "END", "end"]) | json_values,
            "user": json_values,
        }),
)


@pytest.fixture(scope="module")
def client(nim_server):
    with httpx.Client(base_url=nim_server.url, timeout=60) as c:
        yield c
    c2 = httpx.Client(base_url=nim_server.url, timeout=60)
    assert c2.get("/v1/health/live").status_code == 200  # still alive after everything
    assert c2.post("/v1/embeddings", json={"model": MODEL_ID, "input": "after the fuzz"}).status_code == 200
    c2.close()
    print(f"fuzz cases sent: {COUNT}")


@given(body=bodies)
@settings(RUN, max_examples=FUZZ_EXAMPLES)
def test_random_bodies_never_cause_a_server_error(client, body):
    response = client.post("/v1/embeddings", json=body)
    COUNT["hypothesis_json"] = COUNT.get("hypothesis_json", 0) + 1
    check(response.status_code, response.headers.get("content-type", ""), response.text)
    if response.status_code == 200:
        answer = response.json()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        assert [d["index"] for d in answer["data"]] == list(range(len(inputs)))


@given(raw=st.binary(max_size=300) | st.builds(lambda b: b.encode("utf-8", "surrogatepass"),
                                               st.text(max_size=100)))
@settings(RUN, max_examples=max(10, FUZZ_EXAMPLES // 5))
def test_random_bytes_never_cause_a_server_error(client, raw):
    response = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    COUNT["hypothesis_bytes"] = COUNT.get("hypothesis_bytes", 0) + 1
    check(response.status_code, response.headers.get("content-type", ""), response.text)
