"""The service end to end: a real `bentoml serve` of the tiny checkpoint (tests/service_fixtures.py), spoken to as
NIM's API reference, the API contract (/work/shared/API_CONTRACT.md) and real clients speak to it.

The tiny checkpoint's embedding size is 64, so every "2048" of the contract reads 64 here (dimensions 4 … 64,
binary vectors of 8 bytes); its token limits are lowered (SERVER_ENV) so that each one is crossed cheaply.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import time

import httpx
import jax
import numpy as np
import pytest
from PIL import Image

from tests.service_fixtures import MODEL_ID, SERVER_ENV, png_header_only

D = 64  # the tiny checkpoint's embedding size
MAX_TEXT = int(SERVER_ENV["EMBED_MAX_TOKENS_TEXT"])
MAX_IMAGE = int(SERVER_ENV["EMBED_MAX_TOKENS_IMAGE"])
MAX_TEXT_IMAGE = int(SERVER_ENV["EMBED_MAX_TOKENS_TEXT_IMAGE"])


# ---- helpers -----------------------------------------------------------------------------------------------------------
def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(image_bytes(image, fmt)).decode()}"


# Tiles (and so image tokens) depend on the size: 64x64 -> 1 tile, 128x64 -> 3, 100x100 -> 5, 120x90 -> 7 (over the
# 32-token image limit).
SMALL, WIDE, SQUARE, TOO_MANY_TILES = noise_image(64, 64, 1), noise_image(128, 64, 2), noise_image(100, 100, 3), \
    noise_image(120, 90, 4)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(autouse=True)
def _server_log_on_failure(server):
    """Every test here uses the server; the `server` fixture prints its log when the test fails."""
    yield


@pytest.fixture(scope="module")
def client(nim_server):
    with httpx.Client(base_url=nim_server.url, timeout=120) as c:
        yield c


def post(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": MODEL_ID, **body})


def vectors(client: httpx.Client, **body) -> np.ndarray:
    response = post(client, **body)
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def assert_error(response: httpx.Response, status: int, type_: str, message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"object", "message", "type"}, body
    assert body["object"] == "error" and body["type"] == type_, body
    if message is not None:
        assert body["message"] == message
    assert "Traceback" not in body["message"]
    return body


# The server computes on the CPU (JAX_PLATFORMS=cpu in the fixture, so its numbers do not depend on the machine):
# the reference does too, also where this process sees a GPU.
CPU = jax.devices("cpu")[0]


@pytest.fixture(scope="module")
def embedder(nim_server, tiny_checkpoint):
    """The library's Embedder on the same checkpoint (reusing the server's conversion), for parity checks."""
    from model import Embedder

    previous = os.environ.get("EMBED_CACHE_DIR")
    os.environ["EMBED_CACHE_DIR"] = nim_server.env["EMBED_CACHE_DIR"]
    try:
        with jax.default_device(CPU):
            return Embedder.from_pretrained(tiny_checkpoint, dtype="float32")
    finally:
        if previous is None:
            del os.environ["EMBED_CACHE_DIR"]
        else:
            os.environ["EMBED_CACHE_DIR"] = previous


def reference(embedder, text=None, image=None, input_type="passage", truncate="NONE", max_tokens=None):
    from model import EmbedInput

    with jax.default_device(CPU):
        return embedder.embed([EmbedInput(text=text, image=image, input_type=input_type)], truncate, max_tokens)[0]


def long_text(tokens_at_least: int, embedder) -> str:
    words = " ".join(f"word{i}" for i in range(tokens_at_least))
    assert len(embedder.prompter.encode(words, 0, "query")) > tokens_at_least
    return words


# ---- health, before and after the warm-up ------------------------------------------------------------------------------
def test_probes_while_the_model_loads(server):
    seen = {route: (status, body) for route, status, body in server.while_loading}
    assert seen["/v1/health/ready"] == (503, {"object": "health.response", "message": "not ready", "ready": False})
    assert seen["/v1/health/live"] == (200, {"object": "health.response", "message": "live", "live": True})
    status, body = seen["/v1/embeddings"]
    assert status == 503 and body["retry_after"] is not None
    assert body["json"] == {"object": "error", "message": "the model is loading; retry later",
                            "type": "ServiceUnavailableError"}


def test_probes_once_ready(client):
    assert client.get("/v1/health/ready").json() == {"object": "health.response", "message": "ready", "ready": True}
    assert client.get("/v1/health/live").json() == {"object": "health.response", "message": "live", "live": True}
    assert client.get("/readyz").status_code == 200  # BentoML's own probe agrees


# ---- the NIM API reference's examples, as curl sends them --------------------------------------------------------------
def curl(server, *args: str) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
def test_reference_curl_health(server):
    assert curl(server, f"{server.url}/v1/health/ready", "-H", "Accept: application/json") == (
        200, {"object": "health.response", "message": "ready", "ready": True})
    assert curl(server, f"{server.url}/v1/health/live", "-H", "Accept: application/json") == (
        200, {"object": "health.response", "message": "live", "live": True})


@needs_curl
def test_reference_curl_input_type_and_model_suffix_are_identical(server):
    """The reference's pair: input_type in the body, or a `-query` suffix on the model for plain OpenAI clients."""
    with_field = json.dumps({"input": ["What is the population of Pittsburgh?"], "model": MODEL_ID,
                             "input_type": "query", "modality": "text"})
    with_suffix = json.dumps({"input": ["What is the population of Pittsburgh?"], "model": MODEL_ID + "-query",
                              "modality": "text"})
    results = [curl(server, "-X", "POST", f"{server.url}/v1/embeddings", "-H", "accept: application/json",
                    "-H", "Content-Type: application/json", "-d", body) for body in (with_field, with_suffix)]
    (s1, b1), (s2, b2) = results
    assert s1 == s2 == 200 and b1 == b2
    assert b1["object"] == "list" and b1["model"] == MODEL_ID and len(b1["data"][0]["embedding"]) == D
    assert b1["data"][0]["object"] == "embedding" and b1["data"][0]["index"] == 0
    assert b1["usage"]["prompt_tokens"] == b1["usage"]["total_tokens"] > 0


@needs_curl
def test_reference_curl_image_text_image_dimensions_and_types(server):
    url = data_url(SMALL)
    for body, check in [
        ({"input": [url], "model": MODEL_ID, "modality": "image", "input_type": "passage"},
         lambda e: len(e) == D),
        ({"input": [f"Describe the chart\n{url}"], "model": MODEL_ID, "modality": "text_image"},
         lambda e: len(e) == D),
        ({"input": ["a query"], "model": MODEL_ID, "input_type": "query", "dimensions": 16},
         lambda e: len(e) == 16 and abs(np.linalg.norm(e) - 1) < 1e-5),
        ({"input": ["a query"], "model": MODEL_ID, "input_type": "query", "embedding_type": "ubinary"},
         lambda e: len(e) == D // 8 and all(0 <= x <= 255 for x in e)),
    ]:
        status, answer = curl(server, "-X", "POST", f"{server.url}/v1/embeddings", "-H",
                              "Content-Type: application/json", "-d", json.dumps(body))
        assert status == 200, answer
        assert check(answer["data"][0]["embedding"]), (body, answer)


@needs_curl
def test_reference_curl_models(server):
    status, body = curl(server, f"{server.url}/v1/models")
    assert status == 200
    assert body["object"] == "list" and len(body["data"]) == 1
    entry = body["data"][0]
    assert entry["id"] == entry["root"] == MODEL_ID and entry["object"] == "model" and entry["owned_by"] == "nvidia"
    assert isinstance(entry["created"], int)


# ---- errors: every status, every route, the NIM shape ------------------------------------------------------------------
def test_malformed_json_is_400_never_422(client):
    assert_error(client.post("/v1/embeddings", content=b'{"model": '), 400, "BadRequestError")
    assert_error(client.post("/v1/embeddings", content=b""), 400, "BadRequestError")
    assert_error(client.post("/v1/embeddings", content=b'"just a string"'), 400, "BadRequestError",
                 "request body must be a JSON object")
    assert_error(post(client, input={"not": "a string"}), 400, "BadRequestError",
                 "input must be a string or a list of strings")
    assert_error(client.post("/v1/embeddings", json={"input": "x"}), 400, "BadRequestError", "model: Field required")


def test_unknown_model_is_404_with_the_exact_message(client):
    assert_error(client.post("/v1/embeddings", json={"model": "nvidia/nv-embedqa-e5-v5", "input": "x"}), 404,
                 "NotFoundError", f"model 'nvidia/nv-embedqa-e5-v5' not found; available: '{MODEL_ID}'")
    assert_error(client.post("/v1/embeddings", json={"model": MODEL_ID + "-queries", "input": "x",
                                                     "input_type": "query"}), 404, "NotFoundError")


def test_unknown_paths_and_wrong_methods(client):
    for path in ("/v1/nothing", "/v2/embeddings", "/v1/embeddings/extra", "/embeddings"):
        assert_error(client.get(path), 404, "NotFoundError")
    for method, path, allow in [("GET", "/v1/embeddings", "POST"), ("POST", "/v1/models", "GET"),
                                ("DELETE", "/v1/health/ready", "GET"), ("PUT", "/v1/metrics", "GET")]:
        response = client.request(method, path)
        assert_error(response, 405, "MethodNotAllowedError")
        assert response.headers["allow"] == allow


def test_body_over_the_limit_is_413(client):
    limit = int(SERVER_ENV["EMBED_MAX_BODY_BYTES"])
    big = json.dumps({"model": MODEL_ID, "input": "x" * (limit + 10)}).encode()
    assert_error(client.post("/v1/embeddings", content=big), 413, "PayloadTooLargeError",
                 f"request body of {len(big)} bytes exceeds the limit of {limit} bytes")
    chunked = client.post("/v1/embeddings", content=iter([big[:1000], big[1000:]]))  # no Content-Length
    assert_error(chunked, 413, "PayloadTooLargeError", f"request body exceeds the limit of {limit} bytes")


def test_bentoml_own_routes_answer_in_the_nim_shape_too(client):
    assert_error(client.post("/embed_batch", json={"wrong": []}), 400, "BadRequestError")


# ---- inputs ------------------------------------------------------------------------------------------------------------
def test_string_or_list_input_and_order(client):
    one = post(client, input="alpha").json()
    many = post(client, input=["alpha", "beta", "gamma"]).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    np.testing.assert_allclose(one["data"][0]["embedding"], many["data"][0]["embedding"], atol=1e-5)
    reversed_ = post(client, input=["gamma", "beta", "alpha"]).json()
    np.testing.assert_allclose(reversed_["data"][2]["embedding"], many["data"][0]["embedding"], atol=1e-5)


def test_empty_blank_and_too_many_inputs(client):
    assert_error(post(client, input=[]), 400, "BadRequestError", "input must not be empty")
    assert_error(post(client, input=["fine", "", "fine"]), 400, "BadRequestError", "input[1] must not be blank or empty")
    assert_error(post(client, input=["fine", "  \t"]), 400, "BadRequestError", "input[1] must not be blank or empty")
    assert_error(post(client, input=["x"] * 2049), 400, "BadRequestError",
                 "input has 2049 items; at most 2048 are allowed per request")


@pytest.mark.parametrize("form", ["bare", "tag_double", "tag_single", "tag_spaced"])
def test_image_forms_are_inferred_as_image(client, form):
    url = data_url(SMALL)
    value = {"bare": url, "tag_double": f'<img src="{url}"/>', "tag_single": f"<img src='{url}'>",
             "tag_spaced": f'  <img src="{url}" />  '}[form]
    np.testing.assert_allclose(vectors(client, input=[value]), vectors(client, input=[url], modality="image"),
                               atol=1e-6)


@pytest.mark.parametrize("form", ["newline", "space", "after", "tag"])
def test_text_with_an_image_is_inferred_as_text_image(client, embedder, form):
    url = data_url(SMALL)
    value = {"newline": f"a red chart\n{url}", "space": f"a red chart {url}", "after": f"{url}\na red chart",
             "tag": f'a red chart <img src="{url}"/>'}[form]
    served = vectors(client, input=[value])[0]
    # The image always goes first in the prompt, the data URL is removed from the text and the text stripped.
    assert cosine(served, reference(embedder, "a red chart", SMALL)) >= 0.99999
    np.testing.assert_allclose(served, vectors(client, input=[value], modality="text_image")[0], atol=1e-6)


def test_modality_lists_and_mismatches(client):
    url = data_url(SMALL)
    per_item = vectors(client, input=["some text", url, f"caption {url}"], modality=["text", "image", "text_image"])
    inferred = vectors(client, input=["some text", url, f"caption {url}"])
    np.testing.assert_allclose(per_item, inferred, atol=1e-5)
    batch_wide = vectors(client, input=[url, data_url(WIDE)], modality=["image"])
    assert batch_wide.shape == (2, D)
    # Explicit text is used verbatim, even when it holds a data URL (here it is too long as text).
    assert post(client, input=["short"], modality="text").status_code == 200
    assert_error(post(client, input=["a", "b", "c"], modality=["text", "text"]), 400, "BadRequestError")
    assert_error(post(client, input="x", modality="bogus"), 400, "BadRequestError",
                 "modality must be one of 'text', 'image', 'text_image'; got 'bogus'")
    assert_error(post(client, input=["ok", "text only"], modality=["text", "image"]), 400, "BadRequestError",
                 "input[1]: modality 'image' needs an image as a base64 data URL (data:image/png;base64,...); "
                 "image URLs are not fetched")
    assert_error(post(client, input=[f"words {url}"], modality="image"), 400, "BadRequestError",
                 "input[0]: modality 'image' needs exactly one image and no text")
    assert_error(post(client, input=[url], modality="text_image"), 400, "BadRequestError",
                 "input[0]: modality 'text_image' needs text and exactly one image")
    assert_error(post(client, input=[f"{url} {url}"]), 400, "BadRequestError",
                 "input[0]: found 2 images; an input may hold at most one")


def test_urls_are_never_fetched(client):
    html = 'see <img src="http://127.0.0.1:9/never.png"/>'
    assert post(client, input=[html]).status_code == 200  # plain text: nothing is fetched
    assert_error(post(client, input=["http://127.0.0.1:9/never.png"], modality="image"), 400, "BadRequestError")


def test_input_type_defaults_and_query_images(client, embedder):
    text = vectors(client, input=["how tall is it"])[0]
    assert cosine(text, reference(embedder, "how tall is it", input_type="query")) >= 0.99999
    assert cosine(text, reference(embedder, "how tall is it", input_type="passage")) < 0.9999
    image = vectors(client, input=[data_url(SMALL)])[0]
    assert cosine(image, reference(embedder, None, SMALL)) >= 0.99999
    # The API reference's exact words (its error table), with no input index or anything else added.
    message = ('input_type="query" is not supported with images; the VLM model processes images as passages only. '
               'Use input_type="passage" or omit input_type.')
    assert_error(post(client, input=["q", data_url(SMALL)], input_type="query"), 400, "BadRequestError", message)
    assert_error(client.post("/v1/embeddings", json={"model": MODEL_ID + "-query", "input": ["q", data_url(SMALL)]}),
                 400, "BadRequestError", message)


def test_model_suffixes(client):
    base = {"input": ["a passage about things"]}
    as_passage = client.post("/v1/embeddings", json={"model": MODEL_ID + "-passage", **base}).json()
    explicit = post(client, input_type="passage", **base).json()
    assert as_passage["model"] == MODEL_ID
    np.testing.assert_allclose(as_passage["data"][0]["embedding"], explicit["data"][0]["embedding"], atol=1e-6)
    body_wins = client.post("/v1/embeddings", json={"model": MODEL_ID + "-passage", "input_type": "query", **base})
    np.testing.assert_allclose(body_wins.json()["data"][0]["embedding"],
                               post(client, input_type="query", **base).json()["data"][0]["embedding"], atol=1e-6)


def test_user_is_accepted_and_ignored(client):
    np.testing.assert_allclose(vectors(client, input=["x y"], user="someone"), vectors(client, input=["x y"]),
                               atol=1e-6)


# ---- images: limits from the header, bad data named by index -----------------------------------------------------------
def test_image_limits_are_checked_from_the_header(client):
    huge = "data:image/png;base64," + base64.b64encode(png_header_only(100_000, 10)).decode()  # no pixels at all
    assert_error(post(client, input=["fine", huge]), 400, "BadRequestError",
                 "input[1]: image of 100000x10 pixels exceeds the limit of 8192x16384 (either orientation)")
    limit = int(SERVER_ENV["EMBED_MAX_IMAGE_BYTES"])
    heavy = "data:image/png;base64," + base64.b64encode(os.urandom(limit + 3)).decode()
    assert_error(post(client, input=[heavy]), 400, "BadRequestError",
                 f"input[0]: image is {limit + 3} bytes; the limit is {limit} bytes")


def test_corrupt_and_unsupported_images(client):
    assert_error(post(client, input=["data:image/png;base64,bm90IGFuIGltYWdl"]), 400, "BadRequestError",
                 "input[0]: image data is corrupt or not a supported format (png, jpeg, webp, gif, bmp, tiff)")
    assert_error(post(client, input=["data:image/svg+xml;base64,PHN2Zz48L3N2Zz4="]), 400, "BadRequestError")
    # A header that reads fine over pixel data that does not: refused by the runner, still for this input only.
    truncated = image_bytes(SQUARE)[:-200]
    url = "data:image/png;base64," + base64.b64encode(truncated).decode()
    assert_error(post(client, input=["ok", url]), 400, "BadRequestError",
                 "input[1]: image data is corrupt and could not be decoded")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_supported_image_type(client, embedder, fmt):
    served = vectors(client, input=[data_url(SMALL, fmt)])[0]
    decoded = Image.open(io.BytesIO(image_bytes(SMALL, fmt)))
    assert cosine(served, reference(embedder, None, decoded)) >= 0.99999


# ---- token limits and truncation ---------------------------------------------------------------------------------------
def test_truncate_none_refuses_long_inputs(client, embedder):
    text = long_text(MAX_TEXT, embedder)
    n = len(embedder.prompter.encode(text, 0, "query"))
    for body in ({}, {"truncate": "NONE"}):
        assert_error(post(client, input=["short", text], **body), 400, "BadRequestError",
                     f"input[1]: Input length {n} exceeds maximum allowed token size {MAX_TEXT}")


@pytest.mark.parametrize("truncate", ["END", "START"])
def test_truncate_end_and_start(client, embedder, truncate):
    text = long_text(MAX_TEXT, embedder)
    response = post(client, input=[text], truncate=truncate)
    assert response.status_code == 200 and response.json()["usage"]["total_tokens"] == MAX_TEXT
    served = np.array(response.json()["data"][0]["embedding"])
    expected = reference(embedder, text, input_type="query", truncate=truncate, max_tokens=MAX_TEXT)
    assert cosine(served, expected) >= 0.99999
    other = reference(embedder, text, input_type="query", truncate="START" if truncate == "END" else "END",
                      max_tokens=MAX_TEXT)
    assert cosine(served, other) < 0.9999  # END keeps the first tokens, START the last


def test_image_tokens_are_never_cut(client, embedder):
    tokens = len(embedder.prompter.encode(None, embedder.num_tiles(*TOO_MANY_TILES.size), "passage"))
    assert tokens > MAX_IMAGE
    for truncate in ("NONE", "END", "START"):
        assert_error(post(client, input=[data_url(TOO_MANY_TILES)], truncate=truncate), 400, "BadRequestError",
                     f"input[0]: Input length {tokens} exceeds maximum allowed token size {MAX_IMAGE}")
    # With text, only the text is cut, down to the text_image limit.
    text = long_text(MAX_TEXT_IMAGE, embedder)
    response = post(client, input=[f"{text}\n{data_url(SQUARE)}"], truncate="END")
    assert response.status_code == 200 and response.json()["usage"]["total_tokens"] == MAX_TEXT_IMAGE
    expected = reference(embedder, text, SQUARE, truncate="END", max_tokens=MAX_TEXT_IMAGE)
    assert cosine(response.json()["data"][0]["embedding"], expected) >= 0.99999


def test_usage_counts_every_token(client, embedder):
    inputs = ["a query", data_url(WIDE), f"caption\n{data_url(SQUARE)}"]
    expected = (len(embedder.prompter.encode("a query", 0, "query"))
                + len(embedder.prompter.encode(None, embedder.num_tiles(*WIDE.size), "passage"))
                + len(embedder.prompter.encode("caption", embedder.num_tiles(*SQUARE.size), "passage")))
    usage = post(client, input=inputs).json()["usage"]
    assert usage == {"prompt_tokens": expected, "total_tokens": expected}
    assert expected > 3 * 4 + 5 * 4  # image tokens included


# ---- outputs -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_inputs():
    return ["first passage text", data_url(SMALL), f"chart caption\n{data_url(WIDE)}"]


@pytest.fixture(scope="module")
def float_vectors(client, mixed_inputs):
    return vectors(client, input=mixed_inputs)


def test_float_vectors_are_normalised_and_match_the_library(client, embedder, float_vectors):
    np.testing.assert_allclose(np.linalg.norm(float_vectors, axis=1), 1.0, atol=1e-5)
    assert cosine(float_vectors[0], reference(embedder, "first passage text", input_type="query")) >= 0.99999
    assert cosine(float_vectors[1], reference(embedder, None, SMALL)) >= 0.99999
    assert cosine(float_vectors[2], reference(embedder, "chart caption", WIDE)) >= 0.99999


@pytest.mark.parametrize("embedding_type", ["int8", "uint8", "binary", "ubinary"])
def test_embedding_types_are_consistent_with_the_float_vector(client, mixed_inputs, float_vectors, embedding_type):
    got = np.array([d["embedding"] for d in post(client, input=mixed_inputs, embedding_type=embedding_type)
                    .json()["data"]])
    int8 = np.rint(np.clip(float_vectors, -1, 1) * 127).astype(np.int64)
    packed = np.packbits(float_vectors > 0, axis=1).astype(np.int64)  # MSB first
    expected = {"int8": int8, "uint8": int8 + 128, "ubinary": packed, "binary": packed - 128}[embedding_type]
    assert got.shape == ((3, D) if "int8" in embedding_type else (3, D // 8))
    np.testing.assert_array_equal(got, expected)  # the same inputs, batched alike: the very same floats
    bounds = {"int8": (-127, 127), "uint8": (1, 255), "binary": (-128, 127), "ubinary": (0, 255)}[embedding_type]
    assert got.min() >= bounds[0] and got.max() <= bounds[1]


@pytest.mark.parametrize("embedding_type, dtype", [("float", "<f4"), ("int8", "i1"), ("uint8", "u1"),
                                                   ("binary", "i1"), ("ubinary", "u1")])
def test_base64_round_trips(client, mixed_inputs, embedding_type, dtype):
    as_list = post(client, input=mixed_inputs, embedding_type=embedding_type).json()["data"]
    as_b64 = post(client, input=mixed_inputs, embedding_type=embedding_type, encoding_format="base64").json()["data"]
    for a, b in zip(as_list, as_b64):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype=dtype)
        np.testing.assert_allclose(decoded, np.array(a["embedding"], dtype=dtype), atol=1e-6)


def test_every_dimension(client, mixed_inputs, float_vectors):
    for dims in (4, 8, 12, 16, 24, 32, 48, 64):
        got = vectors(client, input=mixed_inputs, dimensions=dims)
        assert got.shape == (3, dims)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        head = float_vectors[:, :dims]
        np.testing.assert_allclose(got, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-5)
    for dims in (128, 2048, 5, 0, -4):  # the published sizes exceed this checkpoint's 64 dimensions
        assert_error(post(client, input="x", dimensions=dims), 400, "BadRequestError",
                     f"dimensions must be one of 4, 8, 12, 16, 24, 32, 48, 64; got {dims}")
    assert_error(post(client, input="x", dimensions=8, embedding_type="int8"), 400, "BadRequestError",
                 "dimensions is supported only with embedding_type 'float'; got 'int8'")


def test_invalid_output_options(client):
    assert_error(post(client, input="x", embedding_type="float16"), 400, "BadRequestError",
                 "Input should be 'float', 'binary', 'ubinary', 'int8' or 'uint8'")
    assert_error(post(client, input="x", encoding_format="bad"), 400, "BadRequestError",
                 "encoding_format must be one of 'float', 'base64'; got 'bad'")
    assert_error(post(client, input="x", truncate="MIDDLE"), 400, "BadRequestError",
                 "truncate must be one of 'NONE', 'START', 'END'; got 'MIDDLE'")


# ---- operational routes ------------------------------------------------------------------------------------------------
def test_metadata_manifest_license_version(client):
    meta = client.get("/v1/metadata").json()
    assert meta["modelInfo"] == [{"shortName": MODEL_ID, "modelUrl": meta["modelInfo"][0]["modelUrl"]}]
    assert meta["limits"]["maxTokens"] == {"text": MAX_TEXT, "image": MAX_IMAGE, "text_image": MAX_TEXT_IMAGE}
    assert meta["limits"]["maxInputsPerRequest"] == 2048 and meta["limits"]["maxTiles"] == 6
    assert meta["capabilities"]["dimensions"] == [4, 8, 12, 16, 24, 32, 48, 64]
    assert set(meta["capabilities"]["embeddingTypes"]) == {"float", "int8", "uint8", "binary", "ubinary"}
    manifest = client.get("/v1/manifest").json()
    assert manifest["model"] == MODEL_ID and manifest["computeDtype"] == "float32"
    assert {"source", "revision", "files", "parameters", "dtype", "config", "tool"} <= set(manifest)
    assert all(len(h) == 64 for h in manifest["files"].values())
    lic = client.get("/v1/license").json()
    assert {"name", "url", "type", "content"} <= set(lic) and "NVIDIA Open Model License" in lic["name"]
    assert [a["type"] for a in lic["additional"]] == ["model", "software"]
    version = client.get("/v1/version").json()
    assert version["api"] == "v1" and version["release"] == meta["version"]


def test_metrics(client):
    post(client, input=["count me", data_url(SMALL)])
    text = client.get("/v1/metrics").text
    for series in ('nim_requests_total{route="/v1/embeddings",status="200"}', 'nim_requests_total{route="unmatched"',
                   "nim_request_duration_seconds_bucket", "nim_queue_duration_seconds_bucket",
                   "nim_inference_duration_seconds_bucket", "nim_batch_size_bucket", "nim_batch_tokens_bucket",
                   'nim_inputs_total{modality="image"}', 'nim_input_tokens_total{modality="text"}',
                   "nim_queue_depth", "nim_compilations_total"):
        assert series in text, series
    assert "bentoml_" not in text  # BentoML's own per-request series are off: ours say the same once


def test_concurrent_requests_share_forward_passes(client):
    """Requests queued while a batch runs go to the next one together (engine/queue.py): fewer batches than
    requests under concurrency, each request answered with its own vector."""
    from concurrent.futures import ThreadPoolExecutor

    def batches() -> float:
        return metric_value(client.get("/v1/metrics").text, "nim_batch_size_count")

    texts = [f"shared pass {i}" for i in range(24)]
    before = batches()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda t: vectors(client, input=[t], input_type="query")[0], texts))
    assert batches() - before < len(texts)
    alone = vectors(client, input=texts[:2], input_type="query")
    assert cosine(answers[0], alone[0]) >= 0.99999 and cosine(answers[1], alone[1]) >= 0.99999


# ---- real clients ------------------------------------------------------------------------------------------------------
def test_openai_sdk(server, client):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="any")
    texts = ["What is a b-tree?", "How do hash maps work?"]
    raw = sdk.embeddings.with_raw_response.create(model=MODEL_ID, input=texts, extra_body={"input_type": "query"})
    sent = json.loads(raw.http_request.content)
    assert sent["encoding_format"] == "base64" and raw.http_request.headers["authorization"] == "Bearer any"
    assert isinstance(json.loads(raw.text)["data"][0]["embedding"], str)  # answered in base64 ...
    default = raw.parse()  # ... which the SDK decodes as little-endian float32
    as_float = sdk.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float",
                                     extra_body={"input_type": "query"})
    expected = vectors(client, input=texts, input_type="query")
    np.testing.assert_allclose([d.embedding for d in default.data], expected, atol=1e-5)
    np.testing.assert_allclose([d.embedding for d in as_float.data], expected, atol=1e-5)
    assert default.usage.total_tokens == as_float.usage.total_tokens > 0
    suffixed = sdk.embeddings.create(model=MODEL_ID + "-query", input=texts)  # a plain OpenAI client
    np.testing.assert_allclose([d.embedding for d in suffixed.data], expected, atol=1e-5)
    short = sdk.embeddings.create(model=MODEL_ID, input=texts[0], dimensions=16, extra_body={"input_type": "query"})
    assert len(short.data[0].embedding) == 16


def test_nvidia_ingestion_client_shape(server, client):
    """NVIDIA's ingestion client: OpenAI SDK, float, passage, END, a per-item modality list, images and text+image."""
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="any")
    inputs = ["a text chunk", data_url(SMALL), f"the chart's caption\n{data_url(WIDE)}"]
    result = sdk.embeddings.create(model=MODEL_ID, input=inputs, encoding_format="float", extra_body={
        "input_type": "passage", "truncate": "END", "modality": ["text", "image", "text_image"]})
    expected = vectors(client, input=inputs, input_type="passage", modality=["text", "image", "text_image"])
    np.testing.assert_allclose([d.embedding for d in result.data], expected, atol=1e-5)


def test_llamaindex_shape(server, client):
    """LlamaIndex's NVIDIAEmbedding: the OpenAI SDK (base64) with input_type and truncate in the body."""
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="nvapi-anything")
    result = sdk.embeddings.create(model=MODEL_ID, input=["llama index query"],
                                   extra_body={"input_type": "query", "truncate": "END"})
    np.testing.assert_allclose(result.data[0].embedding, vectors(client, input=["llama index query"])[0], atol=1e-5)


def test_langchain_shape(client):
    """LangChain's NVIDIAEmbeddings: GET /v1/models (picks by `root`), then float with input_type and truncate NONE,
    and an Authorization header that the service ignores."""
    headers = {"Authorization": "Bearer **********"}
    models = client.get("/v1/models", headers=headers).json()
    assert [m["root"] for m in models["data"]] == [MODEL_ID]
    response = client.post("/v1/embeddings", headers=headers, json={
        "input": ["langchain document"], "model": MODEL_ID, "input_type": "passage", "truncate": "NONE",
        "encoding_format": "float"})
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == D


def test_langchain_client(server, client):
    """The real LangChain client, where it is installed (pip install langchain-nvidia-ai-endpoints)."""
    nvidia = pytest.importorskip("langchain_nvidia_ai_endpoints")
    embeddings = nvidia.NVIDIAEmbeddings(base_url=f"{server.url}/v1", model=MODEL_ID)
    np.testing.assert_allclose(embeddings.embed_query("what is a b-tree?"),
                               vectors(client, input=["what is a b-tree?"], input_type="query")[0], atol=1e-5)
    documents = embeddings.embed_documents(["first document", "second document"])
    np.testing.assert_allclose(documents, vectors(client, input=["first document", "second document"],
                                                  input_type="passage"), atol=1e-5)
    short = nvidia.NVIDIAEmbeddings(base_url=f"{server.url}/v1", model=MODEL_ID, truncate="END", dimensions=16)
    assert len(short.embed_query("x")) == 16


def test_bentoml_client_on_embed_batch(server, embedder, client):
    import bentoml

    ids = embedder.prompter.encode("direct tokens", 0, "query").tolist()
    image = base64.b64encode(image_bytes(SMALL)).decode()
    with bentoml.SyncHTTPClient(server.url) as bento:
        results = bento.embed_batch(items=[
            {"token_ids": ids},
            {"text": "direct tokens", "input_type": "query"},
            {"image": image},
            {"image": "data:image/png;base64," + image, "text": "caption"},
            {"token_ids": [10**6]},  # out of the vocabulary: this item alone fails
            {"text": ""},
        ])
    decoded = [np.frombuffer(base64.b64decode(r["embedding"]), "<f4") if r["embedding"] else None for r in results]
    np.testing.assert_allclose(decoded[0], decoded[1], atol=1e-6)
    np.testing.assert_allclose(decoded[0], vectors(client, input=["direct tokens"])[0], atol=1e-5)
    assert cosine(decoded[2], reference(embedder, None, SMALL)) >= 0.99999
    assert cosine(decoded[3], reference(embedder, "caption", SMALL)) >= 0.99999
    assert results[0]["tokens"] == len(ids) and results[0]["error"] is None
    assert results[4]["error"]["status"] == 400 and "token_ids must lie in" in results[4]["error"]["message"]
    assert results[5]["error"] == {"status": 400, "message": "an item needs token_ids, text or an image"}


# ---- batching: concurrent requests share forward passes, and each gets its own answer ----------------------------------
def _mixed_request(i: int) -> dict:
    kind = i % 5
    if kind == 0:
        return {"input": [f"query number {i}"], "input_type": "query"}
    if kind == 1:
        return {"input": [f"passage {i} " * (i % 7 + 1), "another passage"], "input_type": "passage"}
    if kind == 2:
        return {"input": data_url(noise_image(64, 64, 100 + i))}
    if kind == 3:
        return {"input": [f"caption {i}\n{data_url(noise_image(128, 64, 200 + i))}", "and text"]}
    return {"input": [f"x{i}", f"y{i}", f"z{i}"], "encoding_format": "base64"}


def metric(client: httpx.Client, name: str) -> float:
    response = client.get("/v1/metrics")
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /v1/metrics:\n{response.text}")


def _decode(body: dict) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
                     else d["embedding"] for d in body["data"]], dtype=np.float32)


def test_fifty_concurrent_requests_get_their_own_vectors(server, client):
    requests = [{"model": MODEL_ID, **_mixed_request(i)} for i in range(50)]
    alone = [client.post("/v1/embeddings", json=r) for r in requests]
    assert all(r.status_code == 200 for r in alone)

    before = metric(client, "nim_batch_size_count")

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/embeddings", json=r) for r in requests])

    together = asyncio.run(all_at_once())
    assert metric(client, "nim_batch_size_count") - before < 50, "concurrent requests should share batches"
    for a, b in zip(alone, together):
        assert b.status_code == 200, b.text
        assert a.json()["usage"] == b.json()["usage"]
        np.testing.assert_allclose(_decode(b.json()), _decode(a.json()), atol=1e-5)


def test_a_lone_request_is_not_held_after_a_burst(server, client):
    """BentoML's batcher learns how long to hold a request for company from past queue waits; after bursts it held
    a lone request ~0.1 s here, for minutes. NIM_MAX_WAIT_MS (10 ms) bounds that hold."""
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            await asyncio.gather(*[c.post("/v1/embeddings", json={"model": MODEL_ID, "input": [f"q {i}"]})
                                   for i in range(50)])

    for _ in range(12):  # past the batcher's training, where it sends requests one by one
        assert post(client, input=["warm"]).status_code == 200
    asyncio.run(burst())
    asyncio.run(burst())
    time.sleep(5.5)  # the batcher refreshes what it learned at most every 5 s
    assert post(client, input=["refresh"]).status_code == 200
    waited, count = metric(client, "nim_queue_duration_seconds_sum"), metric(client, "nim_queue_duration_seconds_count")
    for _ in range(5):
        assert post(client, input=["a lone query"]).status_code == 200
    mean_wait = (metric(client, "nim_queue_duration_seconds_sum") - waited) / (
        metric(client, "nim_queue_duration_seconds_count") - count)
    assert mean_wait < 0.03, mean_wait


def test_a_bad_input_fails_only_its_own_request(server):
    truncated = "data:image/png;base64," + base64.b64encode(image_bytes(SQUARE)[:-200]).decode()
    good = [{"model": MODEL_ID, "input": [f"good request {i}", data_url(SMALL)]} for i in range(8)]
    bad = {"model": MODEL_ID, "input": ["fine", truncated]}  # fails inside the batch, in the runner

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/embeddings", json=r) for r in [*good[:4], bad, *good[4:]]])

    responses = asyncio.run(run())
    assert_error(responses[4], 400, "BadRequestError", "input[1]: image data is corrupt and could not be decoded")
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 4)


# ---- the engine behind the service: every bucket compiled before ready, none after ------------------------------------
def metric_value(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_nothing_compiles_after_ready_and_padding_is_measured(server, client):
    """Runs last in this module: after every request above (all modalities, sizes, batch mixes)."""
    text = client.get("/v1/metrics").text
    assert metric_value(text, "nim_compilations_total") > 0  # the warm-up compiled the buckets...
    assert metric_value(text, "nim_compilations_after_ready_total") == 0  # ...and serving compiled nothing
    assert metric_value(text, "nim_warmup_seconds") > 0 and metric_value(text, "nim_startup_seconds") > 0
    real = metric_value(text, "nim_forward_real_tokens_total")
    computed = metric_value(text, "nim_forward_computed_tokens_total")
    assert 0 < real <= computed
    assert metric_value(text, 'nim_forward_passes_total{kind="multimodal"}') > 0
    assert "ready:" in server.log.read_text() and "buckets compiled" in server.log.read_text()
