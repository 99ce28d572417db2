"""Hardening end to end on the shared test server (tests/service_fixtures.py): hostile input, the streaming body
limit, no URL fetching, request ids and access logs, the OpenAPI document, and 240 concurrent mixed requests that
must each get exactly what they get alone while the probes stay quick."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.encoding import decode
from tests.service_fixtures import MODEL_ID, SERVER_ENV, png_header_only
from tests.test_image_modes import CASES as IMAGE_MODES
from tests.test_service_http import SMALL, WIDE, assert_error, data_url, image_bytes, noise_image

LIMIT = int(SERVER_ENV["EMBED_MAX_BODY_BYTES"])


@pytest.fixture(scope="module")
def client(nim_server):
    with httpx.Client(base_url=nim_server.url, timeout=120) as c:
        yield c


def post(client, **body) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": MODEL_ID, **body})


def vector(client, value: str, **body) -> np.ndarray:
    response = post(client, input=[value], **body)
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"], np.float32)


def b64_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def real_png_bomb(width: int, height: int) -> bytes:
    """A genuine PNG of width x height black pixels: a few hundred KB that would decode to hundreds of MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row * 256) for _ in range(height // 256)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- hostile input: every case a 4xx in the NIM shape, and the worker keeps serving ------------------------------------
def test_hostile_bodies_are_4xx_without_a_trace(server, client):
    offset = server.log.stat().st_size
    bomb = real_png_bomb(9000, 9000)
    assert len(bomb) < int(SERVER_ENV["EMBED_MAX_IMAGE_BYTES"])  # passes the byte limit: only the header stops it
    bad_bodies = [
        json.dumps({"model": MODEL_ID, "input": [b64_url(bomb)]}).encode(),
        json.dumps({"model": MODEL_ID, "input": [b64_url(png_header_only(100_000, 100_000))]}).encode(),
        json.dumps({"model": MODEL_ID, "input": [b64_url(image_bytes(SMALL)[:60])]}).encode(),  # header cut short
        json.dumps({"model": MODEL_ID, "input": ["data:image/png;base64,abc"]}).encode(),  # not base64
        json.dumps({"model": MODEL_ID, "input": ["data:image/png;base64,!!!!"]}).encode(),  # empty payload
        json.dumps({"model": MODEL_ID, "input": [b64_url(image_bytes(SMALL), "svg+xml")]}).encode(),
        json.dumps({"model": MODEL_ID, "input": [b64_url(b"GIF89a" + b"\x00" * 40, "gif")]}).encode(),
        json.dumps({"model": MODEL_ID, "input": "x" * (LIMIT - 1000)}).encode(),  # 2 MB: far over 64 tokens
        b'{"model": "%s", "input": "x", "extra": %s%s}' % (MODEL_ID.encode(), b"[" * 50_000, b"]" * 50_000),
        b'{"model": "%s", "input": "\xff\xfe\xfd"}' % MODEL_ID.encode(),  # not UTF-8
        json.dumps({"model": MODEL_ID, "input": "x"}).encode("utf-16"),
        b'{"model": "%s", "input": "\\ud800"}' % MODEL_ID.encode(),  # a lone surrogate
        b'{"model": "%s", "input": "x", "dimensions": NaN}' % MODEL_ID.encode(),
        json.dumps({"model": MODEL_ID, "input": "x", "dimensions": 10**100}).encode(),
        json.dumps({"model": MODEL_ID, "input": ["x"] * 5000}).encode(),
        json.dumps({"model": MODEL_ID, "input": [["nested"]]}).encode(),
        json.dumps({"model": ["list"], "input": "x"}).encode(),
        b"\x00" * 1000,
    ]
    for body in bad_bodies:
        start = time.perf_counter()
        response = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (body[:80], response.text)
        assert_error(response, response.status_code, "BadRequestError")
        assert time.perf_counter() - start < 10, body[:80]
    assert post(client, input="still serving").status_code == 200
    assert "Traceback" not in server.log_text(offset)


def test_huge_texts_are_refused_or_cut_before_tokenising(client):
    start = time.perf_counter()
    assert_error(post(client, input="word " * 400_000), 400, "BadRequestError")  # 2 MB, NONE
    cut = post(client, input="word " * 400_000, truncate="END")
    assert cut.status_code == 200 and cut.json()["usage"]["total_tokens"] <= int(SERVER_ENV["EMBED_MAX_TOKENS_TEXT"])
    assert time.perf_counter() - start < 10


def test_body_limit_is_enforced_while_the_body_streams(server):
    """413 arrives while the body is still open: sent a little over the limit and never finished, a server that
    waited for the whole body (or measured it afterwards) would never answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(LIMIT // len(chunk) + 2):  # never the final chunk
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while b"PayloadTooLargeError" not in answer:  # headers and body may come in separate segments
            part = s.recv(65536)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b'"type":"PayloadTooLargeError"' in answer, answer[:300]
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a declared 10 GB body: refused at once
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("declared, fmt", [("png", "JPEG"), ("gif", "PNG"), ("jpeg", "WEBP")])
def test_the_bytes_decide_the_format_not_the_data_url(client, declared, fmt):
    """A mislabelled image is decoded by its content (its bytes name their format); only supported formats pass."""
    raw = encoded(SMALL, fmt)
    np.testing.assert_allclose(vector(client, b64_url(raw, declared)), vector(client, b64_url(raw, fmt.lower())),
                               atol=1e-6)


def test_animated_images_use_their_first_frame(client):
    frames = [noise_image(64, 64, 7), noise_image(64, 64, 8)]
    for fmt in ("GIF", "WEBP", "PNG"):
        raw = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True}
                                                                                  if fmt == "WEBP" else {}))
        with Image.open(io.BytesIO(raw)) as animated:
            assert animated.n_frames == 2
            first = encoded(animated.convert("RGB"), "PNG")  # frame 0, as Pillow decodes it
        np.testing.assert_allclose(vector(client, b64_url(raw, fmt.lower())), vector(client, b64_url(first)),
                                   atol=1e-6, err_msg=fmt)


@pytest.mark.parametrize("mode", list(IMAGE_MODES))
def test_every_image_mode_gives_the_python_apis_vector(client, tiny_embedder, mode):
    """The same bytes, the same pixels (the reference processor's convert("RGB")) through HTTP and the Python API;
    tests/test_image_modes.py checks both against the PyTorch reference."""
    raw, _ = IMAGE_MODES[mode]
    served = vector(client, b64_url(raw, "jpeg" if "JPEG" in mode else "png"))
    [local] = tiny_embedder.embed([{"image": raw}])
    assert float(served @ local) >= 0.99999
    np.testing.assert_allclose(served, local, atol=1e-5)


def test_image_urls_are_refused_and_never_fetched(client):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    hits, done = [], threading.Event()

    def watch():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
                hits.append(conn.recv(1024))
                conn.close()
            except (socket.timeout, OSError):
                continue

    watcher = threading.Thread(target=watch)
    watcher.start()
    url = f"http://127.0.0.1:{port}/secret.png"
    try:
        assert_error(post(client, input=[url], modality="image"), 400, "BadRequestError")
        assert_error(post(client, input=[f'<img src="{url}"/>'], modality="image"), 400, "BadRequestError")
        assert_error(post(client, input=[f"caption {url}"], modality="text_image"), 400, "BadRequestError")
        assert post(client, input=[f'see <img src="{url}"/>']).status_code == 200  # text: read, not fetched
        assert post(client, input=[url]).status_code == 200
    finally:
        time.sleep(0.5)  # a fetch, had one started, would have connected by now
        done.set()
        watcher.join()
        listener.close()
    assert hits == []


# ---- request ids, access log, OpenAPI ----------------------------------------------------------------------------------
def test_request_ids_are_echoed_and_logged_without_bodies(server, client):
    offset = server.log.stat().st_size
    marker = "confidential-marker-7d1f"
    given = client.post("/v1/embeddings", headers={"x-request-id": "req-42"},
                        json={"model": MODEL_ID, "input": [marker, "two"]})
    fresh = client.get("/v1/health/live")
    assert given.headers["x-request-id"] == "req-42" and len(fresh.headers["x-request-id"]) == 32
    time.sleep(0.5)
    lines = [json.loads(line) for line in server.log_text(offset).splitlines() if line.startswith('{"time"')]
    mine = next(line for line in lines if line["request_id"] == "req-42")
    assert (mine["method"], mine["path"], mine["status"], mine["inputs"]) == ("POST", "/v1/embeddings", 200, 2)
    assert mine["tokens"] == given.json()["usage"]["total_tokens"] and mine["duration_ms"] > 0
    assert any(line["request_id"] == fresh.headers["x-request-id"] for line in lines)
    assert not any(line["path"] == "/embed_batch" for line in lines)  # the batcher is called in process
    assert marker not in server.log_text(offset)


def test_the_openapi_describes_the_nim_routes(client):
    ours = client.get("/v1/openapi.json").json()
    assert ours["paths"]["/v1/embeddings"]["post"]["requestBody"]
    bento = client.get("/docs.json").json()  # BentoML's own document, with ours merged in
    assert {"/v1/embeddings", "/v1/models", "/v1/health/ready", "/embed_batch"} <= set(bento["paths"])
    assert client.get("/").status_code == 200  # Swagger UI, no longer hidden by the catch-all 404


# ---- correctness under load --------------------------------------------------------------------------------------------
def _request(i: int) -> dict:
    """240 distinct requests over every modality, embedding type, encoding, dimension and truncate mode."""
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    kind = i % 8
    body: dict = {"model": MODEL_ID}
    if kind == 0:
        body.update(input=[f"query {i} about tables"], input_type="query", dimensions=[4, 8, 16, 32, 48, 64][i % 6])
    elif kind == 1:
        body.update(input=[f"passage {i} " * (i % 9 + 1), f"second {i}"], input_type="passage",
                    embedding_type=types[i % 5], encoding_format=["float", "base64"][i % 2])
    elif kind == 2:
        body.update(input=data_url(noise_image(64, 64, 1000 + i)), encoding_format="base64")
    elif kind == 3:
        body.update(input=[f"caption {i}\n{data_url(noise_image(128, 64, 2000 + i))}", f"text {i}"],
                    modality=["text_image", "text"], embedding_type=types[i % 5])
    elif kind == 4:
        body.update(input=["long " * 80 + str(i)], truncate=["END", "START"][i % 2])
    elif kind == 5:
        body.update(input=[f"a {i}", f"b {i}", f"c {i}"], model=MODEL_ID + "-passage", dimensions=16)
    elif kind == 6:
        body.update(input=[data_url(WIDE), f"{i}"], modality=["image", "text"], encoding_format="base64",
                    embedding_type="ubinary")
    else:
        body.update(input=f'<img src="{data_url(SMALL)}"/> figure {i}', truncate="END")
    return body


def _vectors(body: dict) -> list:
    return [d["embedding"] for d in body["data"]]


def _same(request: dict, a: dict, b: dict) -> None:
    """Same order, usage and vectors (float within 1e-5; a quantised value may sit on a rounding edge: off by one,
    a binary vector by one bit)."""
    assert [d["index"] for d in b["data"]] == list(range(len(request["input"]) if isinstance(request["input"], list)
                                                         else 1))
    assert a["usage"] == b["usage"] and a["model"] == b["model"] and len(a["data"]) == len(b["data"])
    kind = request.get("embedding_type", "float")
    for x, y in zip(_vectors(a), _vectors(b)):
        x, y = decode(x, kind).astype(np.float64), decode(y, kind).astype(np.float64)
        if kind == "float":
            np.testing.assert_allclose(x, y, atol=1e-5)
        elif kind in ("int8", "uint8"):
            np.testing.assert_allclose(x, y, atol=1)
        else:
            flipped = np.unpackbits((x.astype(np.int64) & 255).astype(np.uint8) ^
                                    (y.astype(np.int64) & 255).astype(np.uint8)).sum()
            assert flipped <= 1, flipped


def test_240_concurrent_mixed_requests_each_get_what_they_get_alone(server, client):
    requests = [_request(i) for i in range(240)]
    alone = []
    for r in requests:
        response = client.post("/v1/embeddings", json=r)
        assert response.status_code == 200, response.text
        alone.append(response.json())

    probe_seconds: list[float] = []

    async def probe(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for path in ("/v1/health/live", "/v1/health/ready", "/v1/metrics"):
                start = time.perf_counter()
                assert (await c.get(path)).status_code == 200
                probe_seconds.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)

    async def all_at_once():
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c, \
                httpx.AsyncClient(base_url=server.url, timeout=30) as probes:
            stop = asyncio.Event()
            prober = asyncio.create_task(probe(probes, stop))
            responses = await asyncio.gather(*[c.post("/v1/embeddings", json=r) for r in requests])
            stop.set()
            await prober
            return responses

    together = asyncio.run(all_at_once())
    assert len(together) == len(requests)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b.status_code == 200, (i, b.text)
        _same(requests[i], a, b.json())
    # The probes never queued behind the embeddings: neither behind the batcher nor behind the event loop.
    assert len(probe_seconds) >= 6
    assert float(np.median(probe_seconds)) < 0.5 and max(probe_seconds) < 3.0, sorted(probe_seconds)[-5:]
