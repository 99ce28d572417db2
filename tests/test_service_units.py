"""The service's core, without a server: settings, request validation, input parsing, image checks, encodings, the
error shape of the HTTP plumbing. Fast; the end-to-end behaviour is in test_service_http.py."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import orjson
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from serving import encoding, errors, inputs
from serving.http import NimErrorShape, nim_app, read_body
from serving.prepare import model_input_type
from serving.schemas import EmbeddingRequest, describe_validation_error, parse_embedding_request
from serving.settings import MiB, Settings
from tests.service_fixtures import png_header_only

MODEL_ID = "nvidia/llama-nemotron-embed-vl-1b-v2"


def png_b64(width: int = 32, height: int = 24, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- settings ----------------------------------------------------------------------------------------------------------
def test_settings_defaults_are_the_contract():
    s = Settings.from_env({})
    assert (s.model, s.model_name) == (MODEL_ID, MODEL_ID)
    assert s.dtype is None and s.max_tiles == 6
    assert (s.max_tokens("text"), s.max_tokens("image"), s.max_tokens("text_image")) == (8192, 2048, 10240)
    assert s.max_inputs == 2048 and s.max_image_bytes == 25 * MiB
    assert (s.max_image_short_side, s.max_image_long_side) == (8192, 16384)
    assert s.max_wait_ms == 10


def test_settings_read_the_environment_and_name_bad_values():
    s = Settings.from_env({"EMBED_MODEL": "/models/x", "EMBED_DTYPE": "bfloat16", "NIM_MAX_WAIT_MS": "25",
                           "EMBED_MAX_INPUTS": "", "UNRELATED": "1"})
    assert (s.model, s.dtype, s.max_wait_ms, s.max_inputs) == ("/models/x", "bfloat16", 25, 2048)
    with pytest.raises(ValueError, match=r"EMBED_DTYPE='float16'.*EMBED_MAX_TILES='0'"):
        Settings.from_env({"EMBED_DTYPE": "float16", "EMBED_MAX_TILES": "0"})
    with pytest.raises(ValidationError):  # frozen: read once, never changed
        s.model_copy().__setattr__("max_inputs", 1)
    assert {f.alias for f in Settings.model_fields.values()} >= {
        "EMBED_MODEL", "EMBED_MODEL_NAME", "EMBED_DTYPE", "NIM_MAX_WAIT_MS", "EMBED_MAX_TOKENS_TEXT_IMAGE"}


# ---- request validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ({"model": MODEL_ID, "input": "x", "embedding_type": "bad"},
     "Input should be 'float', 'binary', 'ubinary', 'int8' or 'uint8'"),
    ({"model": MODEL_ID, "input": "x", "encoding_format": "bad"},
     "encoding_format must be one of 'float', 'base64'; got 'bad'"),
    ({"model": MODEL_ID, "input": "x", "modality": "bogus"},
     "modality must be one of 'text', 'image', 'text_image'; got 'bogus'"),
    ({"model": MODEL_ID, "input": ["x", "y"], "modality": ["text", "bogus"]},
     "modality must be one of 'text', 'image', 'text_image'; got 'bogus'"),
    ({"model": MODEL_ID, "input": []}, "input must not be empty"),
    ({"model": MODEL_ID, "input": ["ok", " \n"]}, "input[1] must not be blank or empty"),
    ({"model": MODEL_ID, "input": ""}, "input[0] must not be blank or empty"),
    ({"model": MODEL_ID, "input": [1, 2]}, "input must be a string or a list of strings"),
    ({"model": MODEL_ID, "input": "x", "input_type": "question"},
     "input_type must be one of 'query', 'passage'; got 'question'"),
    ({"model": MODEL_ID, "input": "x", "truncate": "end"}, "truncate must be one of 'NONE', 'START', 'END'; got 'end'"),
    ({"model": MODEL_ID, "input": ["a", "b", "c"], "modality": ["text", "text"]},
     "modality has 2 values for 3 inputs; give one value per input or a single batch-wide value"),
    ({"input": "x"}, "model: Field required"),
    ({"model": MODEL_ID, "input": "x", "dimensions": "128"}, "dimensions: Input should be a valid integer"),
])
def test_request_validation_messages(body, message):
    with pytest.raises(ValidationError) as e:
        EmbeddingRequest.model_validate(body)
    assert describe_validation_error(e.value) == message


@pytest.mark.parametrize("body, message", [
    (b"{bad", "request body is not valid JSON: key must be a string at line 1 column 2"),
    (b"", "request body is not valid JSON: EOF while parsing a value at line 1 column 0"),
    (b"\xff\xfe", "request body is not valid JSON: expected value at line 1 column 1"),
    (b"[1]", "request body must be a JSON object"),
    (b'"text"', "request body must be a JSON object"),
])
def test_malformed_bodies(body, message):
    with pytest.raises(errors.BadRequestError) as e:
        parse_embedding_request(body)
    assert e.value.message == message


def test_request_accepts_what_real_clients_send():
    req = EmbeddingRequest.model_validate({"model": MODEL_ID, "input": "x", "user": "u", "extra_field": 1,
                                           "modality": "text", "encoding_format": None})
    assert req.input == ["x"] and req.modality_of(0) == "text" and req.encoding_format is None
    req = EmbeddingRequest.model_validate({"model": MODEL_ID, "input": ["a", "b"], "modality": ["text", "image"]})
    assert [req.modality_of(i) for i in range(2)] == ["text", "image"]


def test_model_suffixes_set_the_input_type():
    assert model_input_type(MODEL_ID, MODEL_ID) is None
    assert model_input_type(MODEL_ID + "-query", MODEL_ID) == "query"
    assert model_input_type(MODEL_ID + "-passage", MODEL_ID) == "passage"
    with pytest.raises(errors.NotFoundError) as e:
        model_input_type("nvidia/other", MODEL_ID)
    assert e.value.message == f"model 'nvidia/other' not found; available: '{MODEL_ID}'"


# ---- input parsing -----------------------------------------------------------------------------------------------------
IMG = png_b64()
URL = f"data:image/png;base64,{IMG}"


@pytest.mark.parametrize("value, modality, text", [
    (URL, "image", None),
    (f'<img src="{URL}"/>', "image", None),
    (f"<img src='{URL}'>", "image", None),
    (f"  {URL}\n", "image", None),
    (f"What is shown?\n{URL}", "text_image", "What is shown?"),
    (f"What is shown? {URL}", "text_image", "What is shown?"),
    (f"{URL} a caption after", "text_image", "a caption after"),
    (f'before <img src="{URL}" /> after', "text_image", "before after"),
    ("just text", "text", "just text"),
    ('html <img src="https://example.com/a.png"/>', "text", 'html <img src="https://example.com/a.png"/>'),
])
def test_modality_is_inferred(value, modality, text):
    parsed = inputs.parse_input(value, None)
    assert (parsed.modality, parsed.text) == (modality, text)
    assert parsed.image == (None if modality == "text" else IMG)


def test_explicit_modality_must_fit():
    assert inputs.parse_input(URL, "text") == inputs.ParsedInput("text", URL, None)  # verbatim
    assert inputs.parse_input(URL, "image").image == IMG
    assert inputs.parse_input(f"t {URL}", "text_image").text == "t"
    for value, modality in [("text only", "image"), (f"t {URL}", "image"), (URL, "text_image"),
                            ("text only", "text_image")]:
        with pytest.raises(ValueError, match=f"modality '{modality}' needs"):
            inputs.parse_input(value, modality)


def test_more_than_one_image_and_unsupported_types_are_refused():
    with pytest.raises(ValueError, match="found 2 images"):
        inputs.parse_input(f"{URL} and {URL}", None)
    with pytest.raises(ValueError, match="found 2 images"):
        inputs.parse_input(URL + URL, None)
    with pytest.raises(ValueError, match=r"unsupported image type 'image/svg\+xml'"):
        inputs.parse_input("data:image/svg+xml;base64,PHN2Zz4=", None)
    assert inputs.parse_input("data:image/jpg;base64," + IMG, None).modality == "image"


LIMITS = dict(max_bytes=25 * MiB, max_short_side=8192, max_long_side=16384)


def test_image_header_checks_read_no_pixels():
    assert inputs.inspect_image(png_b64(40, 30), **LIMITS).__dict__ == {
        "width": 40, "height": 30, "format": "png", "num_bytes": len(base64.b64decode(png_b64(40, 30)))}
    huge = base64.b64encode(png_header_only(100_000, 10)).decode()  # declared in IHDR; no pixels exist
    with pytest.raises(ValueError, match="100000x10 pixels exceeds the limit of 8192x16384"):
        inputs.inspect_image(huge, **LIMITS)
    tall = base64.b64encode(png_header_only(8000, 16000)).decode()  # within limits in the other orientation
    assert inputs.inspect_image(tall, **LIMITS).height == 16000
    too_big = base64.b64encode(png_header_only(9000, 9000)).decode()
    with pytest.raises(ValueError, match="exceeds the limit"):
        inputs.inspect_image(too_big, **LIMITS)


def noise_image(width: int, height: int, fmt: str, **save) -> str:
    """base64 of an incompressible image file (megabytes for a page), as pipelines send scans."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def test_a_large_images_header_is_read_from_its_first_kilobytes_or_else_from_all_of_it():
    page = noise_image(850, 1100, "PNG")
    assert len(page) > 10 * inputs.HEADER_CHARS
    assert (inputs.inspect_image(page, **LIMITS).width, inputs.inspect_image(page, **LIMITS).height) == (850, 1100)
    # A JPEG whose metadata (a 60 KB comment) pushes its frame header past the first kilobytes: read in full.
    late = noise_image(600, 400, "JPEG", comment=b"c" * 60_000)
    assert base64.b64decode(late).find(b"\xff\xc0") > inputs.HEADER_CHARS * 3 // 4
    info = inputs.inspect_image(late, **LIMITS)
    assert (info.width, info.height, info.format) == (600, 400, "jpeg")
    # A large file with a valid header but garbage after it passes this check; decoding it in the batch fails.
    assert inputs.inspect_image(page[:-8] + "!!!!!!!!", **LIMITS).width == 850
    with pytest.raises(ValueError, match="not valid base64"):
        inputs.decode_base64(page[:-8] + "!!!!!!!!")


def test_a_payload_running_to_the_end_is_found_without_a_regex_and_the_same_as_with_one(monkeypatch):
    page = noise_image(300, 200, "PNG")
    values = [f"data:image/png;base64,{page}", f"caption\ndata:image/png;base64,{page}",
              f"data:image/png;base64,{page}= tail", f"data:image/png;base64,{page}===", f"data:image/png;base64,{page}é",
              f"data:image/png;base64,{page.rstrip('=')}A=B", f'<img src="data:image/png;base64,{page}"> t',
              f"<img src='data:image/png;base64,{page} x'> t"]
    fast = [inputs.parse_input(v, None) for v in values]
    monkeypatch.setattr(inputs, "_payload_end", lambda value, start: inputs._PAYLOAD.match(value, start).end())
    assert fast == [inputs.parse_input(v, None) for v in values]
    assert fast[0] == inputs.ParsedInput("image", None, page)
    assert fast[1] == inputs.ParsedInput("text_image", "caption", page)


def test_pillow_guard_matches_the_limit():
    saved = Image.MAX_IMAGE_PIXELS
    try:
        inputs.limit_pillow_pixels(8192, 16384)
        bomb = base64.b64encode(png_header_only(16384, 16384)).decode()
        with pytest.raises(ValueError, match="image exceeds the limit of 8192x16384 pixels"):
            inputs.inspect_image(bomb, **LIMITS)  # refused by Pillow itself, from the header
        with pytest.raises(Image.DecompressionBombError):  # so every decode, the runner's too, is bounded
            Image.open(io.BytesIO(base64.b64decode(bomb)))
        assert inputs.inspect_image(base64.b64encode(png_header_only(8192, 16384)).decode(), **LIMITS).width == 8192
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_image_payload_checks():
    with pytest.raises(ValueError, match="image is 30 bytes; the limit is 20 bytes"):
        inputs.inspect_image(base64.b64encode(b"x" * 30).decode(), **{**LIMITS, "max_bytes": 20})
    with pytest.raises(ValueError, match="not valid base64"):
        inputs.inspect_image("abc", **LIMITS)
    with pytest.raises(ValueError, match="corrupt or not a supported format"):
        inputs.inspect_image(base64.b64encode(b"GIF89a-not-really").decode(), **LIMITS)
    with pytest.raises(ValueError, match="corrupt or not a supported format"):  # a real format we do not accept
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "ICO")
        inputs.inspect_image(base64.b64encode(buf.getvalue()).decode(), **LIMITS)
    for size in (0, 1, 5, 100):
        data = base64.b64encode(b"\x00" * size).decode()
        assert inputs.decoded_size(data) == size


# ---- output encodings --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unit_vectors():
    v = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    v[0, :5] = [0.0, 1.0, -1.0, 0.5, -0.5]  # edge values: exactly 0 is not > 0
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_embedding_types_follow_the_contract(unit_vectors):
    v = unit_vectors
    int8 = encoding.convert(v, "int8")
    assert int8.dtype == np.int8 and int8.shape == v.shape
    np.testing.assert_array_equal(int8, np.rint(np.clip(v, -1, 1) * 127).astype(np.int8))
    np.testing.assert_array_equal(encoding.convert(v, "uint8"), int8.astype(np.int16) + 128)
    ubinary = encoding.convert(v, "ubinary")
    assert ubinary.shape == (3, 8) and ubinary.dtype == np.uint8
    bits = np.unpackbits(ubinary, axis=1)  # MSB first
    np.testing.assert_array_equal(bits, (v > 0).astype(np.uint8))
    np.testing.assert_array_equal(encoding.convert(v, "binary"), ubinary.astype(np.int16) - 128)


@pytest.mark.parametrize("embedding_type", ["float", "int8", "uint8", "binary", "ubinary"])
def test_base64_round_trips(unit_vectors, embedding_type):
    converted = encoding.convert(unit_vectors, embedding_type)
    dtype = {"float": "<f4", "int8": "i1", "uint8": "u1", "binary": "i1", "ubinary": "u1"}[embedding_type]
    for row in converted:
        decoded = np.frombuffer(base64.b64decode(encoding.encode(row, "base64")), dtype=dtype)
        np.testing.assert_array_equal(decoded, row)
        # JSON as the server writes it (orjson from numpy) reads back as the very same values: float32 as its
        # shortest round-tripping decimal, integers as integers.
        written = json.loads(orjson.dumps({"embedding": encoding.encode(row, "float")},
                                          option=orjson.OPT_SERIALIZE_NUMPY))["embedding"]
        np.testing.assert_array_equal(np.asarray(written, dtype=dtype), row)
        for fmt, sent in (("base64", encoding.encode(row, "base64")), ("float", written)):
            back = encoding.decode(sent, embedding_type)  # the clients' side (bench/soak.py, the load tests)
            assert back.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(back, row)


def test_dimensions_scale_with_the_embedding_size(unit_vectors):
    assert encoding.allowed_dimensions(2048) == (128, 256, 384, 512, 768, 1024, 1536, 2048)
    assert encoding.allowed_dimensions(64) == (4, 8, 12, 16, 24, 32, 48, 64)
    short = encoding.shorten(unit_vectors, 12)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(short, unit_vectors[:, :12] / np.linalg.norm(unit_vectors[:, :12], axis=1,
                                                                            keepdims=True), rtol=1e-6)
    with pytest.raises(errors.BadRequestError, match="dimensions must be one of 4, 8, 12, 16, 24, 32, 48, 64; got 128"):
        encoding.check_dimensions(128, "float", 64)
    with pytest.raises(errors.BadRequestError, match="only with embedding_type 'float'"):
        encoding.check_dimensions(8, "int8", 64)


# ---- the HTTP plumbing -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plumbing():
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await read_body(request, max_bytes=64))})

    async def boom(request: Request):
        raise RuntimeError("secret internal detail")

    async def unavailable(request: Request):
        raise errors.ServiceUnavailableError("busy")

    app = nim_app([("POST", "/echo", echo), ("GET", "/boom", boom), ("GET", "/busy", unavailable)])
    with TestClient(app) as client:
        yield client


def assert_nim_error(response, status: int, type_: str, message: str | None = None):
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"object", "message", "type"} and body["object"] == "error" and body["type"] == type_
    if message is not None:
        assert body["message"] == message


def test_plumbing_answers_every_error_in_the_nim_shape(plumbing):
    assert plumbing.post("/echo", content=b'{"a": 1}').json() == {"bytes": 8}
    assert_nim_error(plumbing.post("/echo", content=b'{"a": "' + b"x" * 100 + b'"}'), 413, "PayloadTooLargeError")
    chunked = plumbing.post("/echo", content=iter([b'{"a": "', b"x" * 100, b'"}']))  # no Content-Length
    assert_nim_error(chunked, 413, "PayloadTooLargeError", "request body exceeds the limit of 64 bytes")
    assert_nim_error(plumbing.get("/nowhere"), 404, "NotFoundError", "route /nowhere not found")
    wrong = plumbing.get("/echo")
    assert_nim_error(wrong, 405, "MethodNotAllowedError")
    assert wrong.headers["allow"] == "POST"
    crash = plumbing.get("/boom")
    assert_nim_error(crash, 500, "InternalServerError", "internal server error")
    assert "secret" not in crash.text and "Traceback" not in crash.text
    busy = plumbing.get("/busy")
    assert_nim_error(busy, 503, "ServiceUnavailableError", "busy")
    assert busy.headers["retry-after"] == "1"


def test_foreign_errors_are_reshaped():
    async def foreign(scope, receive, send):
        path = scope["path"]
        status, body, kind = {
            "/json": (400, b'{"error": "1 validation error for Input", "detail": [{"loc": ["items"], '
                           b'"msg": "Field required"}]}', b"application/json"),
            "/list": (404, b'[{"error": "Endpoint x not found"}]', b"application/json"),
            "/text": (503, b"Service is not ready", b"text/plain"),
            "/nim": (400, json.dumps(errors.error_body("kept", "BadRequestError")).encode(), b"application/json"),
            "/ok": (200, b"fine", b"text/plain"),
        }[path]
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})

    client = TestClient(NimErrorShape(foreign))  # no lifespan: a bare ASGI app
    assert_nim_error(client.get("/json"), 400, "BadRequestError", "1 validation error for Input: items: Field required")
    assert_nim_error(client.get("/list"), 404, "NotFoundError", "Endpoint x not found")
    assert_nim_error(client.get("/text"), 503, "ServiceUnavailableError", "Service is not ready")
    assert_nim_error(client.get("/nim"), 400, "BadRequestError", "kept")
    assert client.get("/ok").text == "fine"


def test_error_types_by_status():
    assert errors.for_status(400, "m").type == "BadRequestError"
    assert errors.for_status(422, "m").type == "BadRequestError"  # never a 422 type
    assert errors.for_status(503, "m").headers["Retry-After"] == "1"
    assert errors.for_status(500, "m").type == "InternalServerError"
    assert errors.error_type(418) == "BadRequestError" and errors.error_type(502) == "InternalServerError"


def test_uvicorn_parses_http_with_httptools():
    """BentoML's workers run uvicorn with http="auto": httptools (a dependency) when installed, else pure-Python
    h11, a slower parser on the served path's hot loop."""
    from uvicorn.config import Config

    config = Config(app=lambda scope, receive, send: None, log_config=None)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
