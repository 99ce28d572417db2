"""`python -m indexer` end to end against a live `bentoml serve` of the tiny checkpoint (tests/service_fixtures.py).

The corpus is made here: PNG/WebP images, a 2-page PDF (Pillow writes multi-page PDFs), JSONL and Parquet texts.
Square pictures: the test server's image token limit (32) admits 1-5 tiles, and a tall picture tiles into 7.
A small Starlette app in front of the server answers 503/429 with Retry-After first, to test the retries.
A fake NIM server (`FakeNim`: made-up vectors, an optional delay per request) serves the tests of ids, Ctrl-C,
request totals and name resolution, which need no model.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from indexer.__main__ import main
from indexer.client import _base_url, _retry_after
from indexer.search import top_k
from indexer.sources import Item, payload
from indexer.store import read_index
from tests.service_fixtures import MODEL_ID, free_port  # noqa: E402

# The live server fixtures (`nim_server`, `server`), registered as a plugin: one server for every test module
# that does the same, where importing the fixtures would start one per module.

MAX_SIDE = 64  # the tiny checkpoint's tile size: one tile per square picture
TEXTS = {"t0": "the cat sat on the mat", "t1": "b-trees keep their leaves at one depth",
         "t2": "quarterly revenue grew by twelve percent", "t3": "the population of Pittsburgh",
         "t4": "a recipe for sourdough bread"}
PARQUET_TEXTS = {"p0": "photosynthesis turns light into sugar", "p1": "the rules of cricket"}
IMAGES = {"a.png": (64, 64), "b.png": (96, 96), "sub/c.webp": (64, 64)}
EXPECTED_IDS = {*TEXTS, *PARQUET_TEXTS, *IMAGES, "doc.pdf#page=1", "doc.pdf#page=2"}


# ---- the corpus -----------------------------------------------------------------------------------------------------
def picture(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    ImageDraw.Draw(image).text((4, 4), f"#{seed}", fill="white")
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for seed, (name, size) in enumerate(IMAGES.items()):
        picture(size, seed, "RGBA" if name.endswith(".webp") else "RGB").save(docs / name)
    pages = [picture((144, 144), 10 + i) for i in range(2)]  # square pages: one tile each once rendered at 64 px
    pages[0].save(docs / "doc.pdf", "PDF", save_all=True, append_images=pages[1:], resolution=72)
    (docs / ".hidden.png").write_bytes(b"ignored: hidden files are skipped")
    (docs / "notes.txt").write_text("ignored: not an image or a PDF")
    with open(root / "texts.jsonl", "w") as f:
        for item_id, text in TEXTS.items():
            f.write(json.dumps({"id": item_id, "text": text}) + "\n")
    pq.write_table(pa.table({"id": list(PARQUET_TEXTS), "text": list(PARQUET_TEXTS.values())}), root / "more.parquet")
    return root


def inputs(corpus: Path) -> list[str]:
    return [str(corpus / "docs"), str(corpus / "texts.jsonl"), str(corpus / "more.parquet")]


def server_vectors(url: str, texts: list[str], input_type: str, modality: list[str]) -> np.ndarray:
    """The server's own float output for these inputs: the reference for every vector the indexer stored."""
    r = httpx.post(f"{url}/v1/embeddings", timeout=120, json={
        "model": MODEL_ID, "input": texts, "input_type": input_type, "modality": modality, "truncate": "END",
        "encoding_format": "float"})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], np.float32)


def embed(argv: list[str], capsys) -> tuple[int, dict]:
    report = Path(argv[argv.index("--output") + 1]).with_suffix(".report.json")
    rc = main(["embed", *argv, "--report", str(report), "--no-progress"])
    capsys.readouterr()
    return rc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def indexed(nim_server, corpus, tmp_path_factory):
    """The corpus indexed once by `python -m indexer embed` as a command (a real subprocess)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("index") / "index.parquet"
    report = out.with_suffix(".report.json")
    proc = subprocess.run([sys.executable, "-m", "indexer", "embed", *inputs(corpus), "--output", str(out),
                           "--server", nim_server.url, "--batch-size", "4", "--chunk-size", "4",
                           "--max-side", str(MAX_SIDE), "--report", str(report)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded 12 items" in proc.stdout
    return out, json.loads(report.read_text())


# ---- embed ----------------------------------------------------------------------------------------------------------
def test_embed_writes_the_index(indexed, nim_server, corpus):
    out, report = indexed
    table = pq.read_table(out)
    assert table.column_names == ["id", "modality", "embedding", "source"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == EXPECTED_IDS
    rows = {row["id"]: row for row in table.select(["id", "modality", "source"]).to_pylist()}
    assert rows["doc.pdf#page=2"] == {"id": "doc.pdf#page=2", "modality": "image",
                                      "source": str(corpus / "docs" / "doc.pdf")}
    assert rows["t1"]["modality"] == "text" and rows["t1"]["source"].endswith("texts.jsonl")
    assert rows["p0"]["source"].endswith("more.parquet")

    _, matrix, _ = read_index(out)
    dim = server_vectors(nim_server.url, ["x"], "query", ["text"]).shape[1]
    assert matrix.shape == (len(EXPECTED_IDS), dim)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

    assert report["items"] == 12 and report["texts"] == 7 and report["images"] == 3 and report["pages"] == 2
    assert report["failed"] == 0 and report["skipped"] == 0 and report["retries"] == 0
    assert report["dimensions"] == dim and report["model"] == MODEL_ID
    assert report["parts_written"] == 3  # chunks of 4 rows
    assert report["items_per_s"] > 0 and report["seconds"] > 0


def test_stored_vectors_are_the_servers_own(indexed, nim_server, corpus):
    out, _ = indexed
    ids, matrix, _ = read_index(out)
    row = {item_id: i for i, item_id in enumerate(ids)}
    texts = {**TEXTS, **PARQUET_TEXTS}
    expected = server_vectors(nim_server.url, list(texts.values()), "passage", ["text"] * len(texts))
    got = matrix[[row[i] for i in texts]]
    assert np.min(np.sum(got * expected, axis=1)) >= 0.9999

    docs = corpus / "docs"
    items = [Item(id=name, modality="image", source="", path=docs / name) for name in IMAGES]
    items += [Item(id=f"doc.pdf#page={p + 1}", modality="image", source="", path=docs / "doc.pdf", page=p)
              for p in range(2)]
    expected = server_vectors(nim_server.url, [payload(i, MAX_SIDE) for i in items], "passage",
                              ["image"] * len(items))
    got = matrix[[row[i.id] for i in items]]
    assert np.min(np.sum(got * expected, axis=1)) >= 0.9999


def test_a_second_run_resumes_without_repeating_work(indexed, nim_server, corpus, tmp_path, capsys):
    out, _ = indexed
    copy = tmp_path / "index.parquet"
    copy.mkdir()
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts:
        (copy / part.name).write_bytes(part.read_bytes())
    args = [*inputs(corpus), "--output", str(copy), "--server", nim_server.url, "--batch-size", "4",
            "--chunk-size", "4", "--max-side", str(MAX_SIDE)]

    rc, report = embed(args, capsys)  # everything is there: no embedding request at all
    assert rc == 0 and report["items"] == 0 and report["skipped"] == 12 and report["requests"] == 0

    # A crash loses at most the chunk being written: drop the last part, leave a half-written temporary file.
    lost = pq.read_table(parts[-1]).column("id").to_pylist()
    (copy / parts[-1].name).unlink()
    (copy / f".{parts[-1].name}.tmp").write_bytes(b"PAR1 truncated")
    rc, report = embed(args, capsys)
    assert rc == 0 and report["items"] == len(lost) == 4 and report["skipped"] == 8
    assert report["requests"] == 1
    ids = pq.read_table(copy).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == EXPECTED_IDS
    assert not list(copy.glob(".*.tmp"))


def test_a_bad_input_fails_alone(nim_server, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        picture((64, 64), 20 + i).save(docs / f"ok{i}.png")
    picture((40, 64), 30).save(docs / "tall.png")  # 2x3 tiles + thumbnail: over the test server's image limit
    (docs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "t.jsonl").write_text('{"id": "x", "text": "fine"}\n{oops\n{"id": "y", "text": "again"}\n')
    out = tmp_path / "index.parquet"
    rc, report = embed([str(docs), str(tmp_path / "t.jsonl"), "--output", str(out), "--server", nim_server.url,
                        "--batch-size", "8", "--max-side", str(MAX_SIDE)], capsys)
    assert rc == 2  # some items failed
    failed = {f["id"]: f["error"] for f in report["failures"]}
    assert set(failed) == {"tall.png", "broken.png", "t.jsonl:2"}
    assert "exceeds maximum allowed token size" in failed["tall.png"]
    assert report["items"] == 5 and report["duplicates"] == 0 and report["collisions"] == []
    assert set(pq.read_table(out).column("id").to_pylist()) == {"ok0.png", "ok1.png", "ok2.png", "x", "y"}


# ---- retries against a server that is overloaded first ------------------------------------------------------------------
class FlakyProxy:
    """Answers the first POSTs to /v1/embeddings from `script` (status, Retry-After), then proxies to the server."""

    def __init__(self, upstream: str):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.upstream = upstream
        self.script: list[tuple[int, str | None]] = []
        self.seen: list[tuple[float, int]] = []  # (time, status) of every embeddings request

        async def embeddings(request: Request) -> Response:
            body = await request.body()
            if self.script:
                status, retry_after = self.script.pop(0)
                self.seen.append((time.monotonic(), status))
                headers = {"Retry-After": retry_after} if retry_after else {}
                return JSONResponse({"object": "error", "message": "overloaded", "type": "ServiceUnavailableError"},
                                    status_code=status, headers=headers)
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(f"{self.upstream}/v1/embeddings", content=body,
                                      headers={"content-type": "application/json"})
            self.seen.append((time.monotonic(), r.status_code))
            return Response(r.content, status_code=r.status_code, media_type="application/json")

        async def models(request: Request) -> Response:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(f"{self.upstream}/v1/models")
            return Response(r.content, status_code=r.status_code, media_type="application/json")

        self.app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]),
                                     Route("/v1/models", models, methods=["GET"])])


@pytest.fixture(scope="module")
def flaky(nim_server):
    import uvicorn

    proxy = FlakyProxy(nim_server.url)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(proxy.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.05)
    proxy.url = f"http://127.0.0.1:{port}"
    yield proxy
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def two_texts(tmp_path) -> Path:
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": f"retry me {i}"}) + "\n" for i in range(2)))
    return path


def test_retries_honour_retry_after_on_503_and_429(flaky, two_texts, tmp_path, capsys):
    flaky.script = [(503, "1"), (429, "1")]
    flaky.seen.clear()
    rc, report = embed([str(two_texts), "--output", str(tmp_path / "i.parquet"), "--server", flaky.url,
                        "--batch-size", "2"], capsys)
    assert rc == 0 and report["items"] == 2 and report["failed"] == 0
    assert report["retries"] == 2 and report["requests"] == 3
    (t0, s0), (t1, s1), (t2, s2) = flaky.seen
    assert (s0, s1, s2) == (503, 429, 200)
    assert t1 - t0 >= 0.9 and t2 - t1 >= 0.9  # waited as told


def test_connection_errors_and_several_servers(flaky, nim_server, tmp_path, capsys):
    flaky.script = []
    flaky.seen.clear()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    texts = tmp_path / "six.jsonl"
    texts.write_text("".join(json.dumps({"id": f"s{i}", "text": f"spread {i}"}) + "\n" for i in range(6)))
    rc, report = embed([str(texts), "--output", str(tmp_path / "i.parquet"), "--server", nim_server.url,
                        "--server", flaky.url, "--server", dead, "--batch-size", "1", "--concurrency", "3",
                        "--model", MODEL_ID], capsys)
    assert rc == 0 and report["items"] == 6 and report["failed"] == 0
    servers = report["servers"]
    assert servers[dead]["errors"] >= 1 and servers[dead]["requests"] == 0
    assert servers[nim_server.url]["requests"] >= 1 and servers[flaky.url]["requests"] >= 1
    assert report["retries"] == servers[dead]["errors"]


def test_retries_give_up_and_report_failures(flaky, two_texts, tmp_path, capsys):
    flaky.script = [(503, "0")] * 3
    rc, report = embed([str(two_texts), "--output", str(tmp_path / "i.parquet"), "--server", flaky.url,
                        "--batch-size", "2", "--max-retries", "2", "--model", MODEL_ID], capsys)
    assert rc == 2 and report["items"] == 0 and report["failed"] == 2 and report["retries"] == 2
    assert all("gave up after 3 attempts" in f["error"] for f in report["failures"])


# ---- search ---------------------------------------------------------------------------------------------------------
def test_search_ranks_by_cosine_with_the_servers_query_vector(indexed, nim_server, capsys):
    out, _ = indexed
    query = TEXTS["t2"]
    assert main(["search", "--index", str(out), "--server", nim_server.url, query, "-k", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)

    ids, matrix, _ = read_index(out)
    q = server_vectors(nim_server.url, [query], "query", ["text"])[0]
    scores = matrix @ q / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(q))
    expected = [ids[i] for i in np.argsort(-scores, kind="stable")[:4]]
    assert [r["id"] for r in results] == expected
    np.testing.assert_allclose([r["score"] for r in results], np.sort(scores)[::-1][:4], atol=1e-5)
    assert results[0]["id"] == "t2"  # the passage with the query's own text comes first
    assert results[0]["modality"] == "text" and results[0]["rank"] == 1

    assert main(["search", "--index", str(out), "--server", nim_server.url, query, "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] == "t2"


# ---- small pieces, no server ----------------------------------------------------------------------------------------
def test_top_k_orders_by_score_then_row():
    matrix = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    assert top_k(matrix, np.array([1, 0], np.float32), 3) == [(0, 1.0), (2, 1.0), (3, pytest.approx(0.6))]
    assert top_k(matrix, np.array([0, 2], np.float32), 10)[0] == (1, 1.0)


def test_retry_after_and_urls():
    def response(value):
        return httpx.Response(503, headers={"Retry-After": value} if value else {})

    assert _retry_after(response("3")) == 3.0
    assert _retry_after(response(None)) is None
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= _retry_after(response(soon)) <= 31
    assert _retry_after(response("garbage")) is None
    assert _base_url("http://h:3000/v1/") == "http://h:3000" == _base_url("h:3000")


def test_unknown_inputs_are_refused(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                 "--server", f"http://127.0.0.1:{free_port()}", "--model", MODEL_ID, "--no-progress"]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_base64_is_what_the_pool_asks_for(monkeypatch):
    """The pool asks for base64 float32 (exact, 4x smaller than JSON) and decodes it little-endian."""
    import asyncio

    from indexer.client import ServerPool

    sent = {}
    vector = np.array([0.6, -0.8], "<f4")

    def handler(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": base64.b64encode(vector.tobytes())
                                                  .decode()}], "usage": {"total_tokens": 3}})

    async def go():
        pool = ServerPool(["http://x"], concurrency=1)
        pool._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with pool:
            return await pool.embed(["hi"], model="m", input_type="query", modality=["text"])

    vectors, tokens = asyncio.run(go())
    assert sent == {"model": "m", "input": ["hi"], "input_type": "query", "truncate": "END",
                    "encoding_format": "base64", "embedding_type": "float", "modality": ["text"]}
    np.testing.assert_array_equal(vectors[0], vector)
    assert tokens == 3


# ---- a fake NIM server: ids, Ctrl-C, request totals, name resolution ------------------------------------------------
class FakeNim:
    """/v1/models and /v1/embeddings with made-up unit vectors (from a hash of each input), `delay_s` per embeddings
    request, and a `script` of error statuses answered first. Counts what it answered."""

    DIM = 8

    def __init__(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.delay_s = 0.0
        self.script: list[int] = []
        self.embedded = 0  # embeddings requests answered 200
        self.lock = threading.Lock()

        async def embeddings(request: Request) -> JSONResponse:
            import asyncio
            import hashlib

            body = await request.json()
            if self.script:
                return JSONResponse({"object": "error", "message": "overloaded"}, status_code=self.script.pop(0),
                                    headers={"Retry-After": "0"})
            await asyncio.sleep(self.delay_s)
            data = []
            for i, text in enumerate(body["input"]):
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
                v = np.random.default_rng(seed).standard_normal(self.DIM).astype("<f4")
                v /= np.linalg.norm(v)
                data.append({"index": i, "object": "embedding",
                             "embedding": base64.b64encode(v.tobytes()).decode()})
            with self.lock:
                self.embedded += 1
            return JSONResponse({"object": "list", "data": data, "model": MODEL_ID,
                                 "usage": {"prompt_tokens": len(data), "total_tokens": len(data)}})

        async def models(request: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

        self.app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]),
                                     Route("/v1/models", models, methods=["GET"])])


@pytest.fixture
def fake():
    import uvicorn

    server = FakeNim()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.05)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    uv.should_exit = True
    thread.join(10)


def two_page_pdf(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [picture((72, 72), seed + i) for i in range(2)]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)


def test_files_of_one_name_in_different_directories_keep_distinct_ids(fake, tmp_path, capsys):
    coll = tmp_path / "coll"
    two_page_pdf(coll / "a" / "report.pdf", 0)
    two_page_pdf(coll / "b" / "report.pdf", 10)
    picture((64, 64), 20).save(coll / "b" / "scan.png")
    out = tmp_path / "index.parquet"
    args = [str(coll / "a"), str(coll / "b"), "--output", str(out), "--server", fake.url,
            "--max-side", str(MAX_SIDE)]
    rc, report = embed(args, capsys)
    expected = {"a/report.pdf#page=1", "a/report.pdf#page=2", "b/report.pdf#page=1", "b/report.pdf#page=2",
                "b/scan.png"}
    assert rc == 0 and report["items"] == 5 and report["pages"] == 4
    assert report["duplicates"] == 0 and report["collisions"] == [] and report["root"] == str(coll)
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(expected)
    sources = dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist()))
    assert sources["b/report.pdf#page=2"] == str(coll / "b" / "report.pdf")
    _, matrix, _ = read_index(out)
    assert len({row.tobytes() for row in matrix}) == 5  # the two documents' pages were all embedded

    # Files given one by one get the same ids; the root recorded in the index keeps them when resuming.
    rc, report = embed([str(coll / "b" / "report.pdf"), str(coll / "a" / "report.pdf"), "--output", str(out),
                        "--server", fake.url], capsys)
    assert rc == 0 and report["items"] == 0 and report["skipped"] == 4 and report["requests"] == 0
    rc, report = embed([str(coll / "b"), "--output", str(out), "--server", fake.url], capsys)
    assert rc == 0 and report["items"] == 0 and report["skipped"] == 3

    # A new input outside that root is refused, rather than silently indexed under ids of another scheme.
    (tmp_path / "elsewhere").mkdir()
    picture((64, 64), 30).save(tmp_path / "elsewhere" / "x.png")
    assert main(["embed", str(tmp_path / "elsewhere"), "--output", str(out), "--server", fake.url,
                 "--no-progress"]) == 1
    assert "outside the corpus root" in capsys.readouterr().err
    # --root chooses another one.
    out2 = tmp_path / "second.parquet"
    rc, report = embed([str(coll / "a"), "--root", str(tmp_path), "--output", str(out2), "--server", fake.url,
                        "--max-side", str(MAX_SIDE)], capsys)
    assert rc == 0 and set(pq.read_table(out2).column("id").to_pylist()) == {"coll/a/report.pdf#page=1",
                                                                             "coll/a/report.pdf#page=2"}


def test_one_id_for_two_items_is_an_error_unless_allowed(fake, tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text('{"id": "x", "text": "first"}\n{"id": "y", "text": "why"}\n')
    (tmp_path / "two.jsonl").write_text('{"id": "z", "text": "zed"}\n{"id": "x", "text": "second"}\n')
    texts = [str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")]
    out = tmp_path / "index.parquet"
    rc, report = embed([*texts, "--output", str(out), "--server", fake.url], capsys)
    assert rc == 1 and report["items"] == 0 and report["requests"] == 0  # stopped before sending anything
    assert report["collisions"] == [{"id": "x", "first": f"{tmp_path / 'one.jsonl'} record 1",
                                     "other": f"{tmp_path / 'two.jsonl'} record 2"}]
    assert not list(out.glob("part-*"))

    rc, report = embed([*texts, "--output", str(out), "--server", fake.url, "--allow-duplicate-ids"], capsys)
    assert rc == 0 and report["items"] == 3 and len(report["collisions"]) == 1
    ids, matrix, _ = read_index(out)
    assert sorted(ids) == ["x", "y", "z"]
    first = fake_vector("first")
    np.testing.assert_array_equal(matrix[ids.index("x")], first)  # the first record of the id won

    # The same file reached twice (its directory and itself) is one item: counted, not an error.
    docs = tmp_path / "docs"
    docs.mkdir()
    picture((64, 64), 1).save(docs / "p.png")
    rc, report = embed([str(docs), str(docs / "p.png"), str(tmp_path / "one.jsonl"), str(tmp_path / "one.jsonl"),
                        "--output", str(tmp_path / "i2.parquet"), "--server", fake.url], capsys)
    assert rc == 0 and report["items"] == 3 and report["duplicates"] == 3 and report["collisions"] == []


def fake_vector(text: str) -> np.ndarray:
    import hashlib

    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(FakeNim.DIM).astype("<f4")
    return v / np.linalg.norm(v)


def test_ctrl_c_stores_what_is_done_and_the_rerun_resumes(fake, tmp_path):
    import signal
    import subprocess
    import sys

    n = 40
    texts = tmp_path / "many.jsonl"
    texts.write_text("".join(json.dumps({"id": f"m{i}", "text": f"slow text {i}"}) + "\n" for i in range(n)))
    out = tmp_path / "index.parquet"
    report_path = tmp_path / "report.json"
    fake.delay_s = 0.2
    command = [sys.executable, "-m", "indexer", "embed", str(texts), "--output", str(out), "--server", fake.url,
               "--batch-size", "2", "--concurrency", "1", "--report", str(report_path), "--no-progress"]
    proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while fake.embedded < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the indexer sent nothing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "run the same command again to resume" in stderr
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True and stdout.startswith("interrupted\nembedded")
    done = report["items"]
    # With one request in flight, the third reaches the server only once the second answer was recorded.
    assert 4 <= done < n
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == done == len(set(ids))  # everything embedded was written, once
    assert not list(out.glob(".*.tmp"))

    fake.delay_s = 0.0
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["skipped"] == done and report["items"] == n - done and not report["interrupted"]
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"m{i}" for i in range(n))


def test_request_totals_agree_with_the_servers(fake, tmp_path, capsys):
    """The model lookup (GET /v1/models) is not counted as an embedding request, neither in the total nor in a
    server's line; retries are what the servers' errors were."""
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"id": f"s{i}", "text": f"sum {i}"}) + "\n" for i in range(5)))
    fake.script = [503, 429]
    rc, report = embed([str(texts), "--output", str(tmp_path / "i.parquet"), "--server", fake.url,
                        "--server", fake.url.replace("127.0.0.1", "localhost"), "--batch-size", "1",
                        "--concurrency", "2"], capsys)
    assert rc == 0 and report["items"] == 5
    servers = report["servers"]
    assert sum(s["requests"] for s in servers.values()) == report["requests"] == 5 + 2
    assert sum(s["errors"] for s in servers.values()) == report["retries"] == 2
    assert f"{report['requests']} requests, {report['retries']} retries" in report_summary(report)


def report_summary(report: dict) -> str:
    from indexer.embed import Report

    return Report(**report).summary()


def test_a_host_name_that_does_not_resolve_fails_at_once(fake, tmp_path, monkeypatch, capsys):
    """Name resolution errors are not retried (a misspelt host does not start resolving); refused connections
    still are (test_connection_errors_and_several_servers)."""
    import socket

    real = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, *args, **kwargs):
        if host in ("embedder.invalid", b"embedder.invalid"):  # anyio passes the IDNA-encoded bytes
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"id": "a", "text": "alpha"}\n')
    bad = "http://embedder.invalid:3000"
    for extra in ([], ["--model", MODEL_ID], ["--model", MODEL_ID, "--server", fake.url]):
        lookups.clear()
        rc = main(["embed", str(texts), "--output", str(tmp_path / "i.parquet"), "--server", bad, *extra,
                   "--no-progress", "--max-retries", "8"])
        err = capsys.readouterr().err
        assert rc == 1 and "cannot resolve the server's host name" in err and bad in err, err
        assert len(lookups) == 1, (extra, lookups, err)  # one attempt, no retries


def test_unresolvable_is_told_from_refused():
    import socket

    from indexer.client import _unresolvable

    def chained(inner: BaseException) -> httpx.ConnectError:
        try:
            try:
                raise inner
            except OSError as e:
                raise httpx.ConnectError(str(e)) from e
        except httpx.ConnectError as e:
            return e

    assert _unresolvable(chained(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")))
    assert not _unresolvable(chained(ConnectionRefusedError(111, "Connection refused")))
    assert not _unresolvable(httpx.ReadTimeout("slow"))
