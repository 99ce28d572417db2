"""`python -m indexer ray` (Ray Data) and the LanceDB index, on a corpus made here and the tiny checkpoint.

One local Ray instance with two CPU workers for the module. The in-process actors' vectors are checked against
`Embedder.embed` called directly, and against what the HTTP path stores (`python -m indexer embed` with the live
`bentoml serve` of tests/service_fixtures.py, whose token limits the in-process run is given). A run is killed
(SIGKILL) after its second LanceDB commit and resumed. The whole module takes about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

pytest.importorskip("ray")
pytest.importorskip("lancedb")

from indexer.__main__ import main  # noqa: E402
from indexer.lance import LanceSink, build_index, open_table, search_vector  # noqa: E402
from indexer.ray_pipeline import RayOptions, pending_rows, run_ray  # noqa: E402
from indexer.ray_workers import ROWS, prepare_batch  # noqa: E402
from indexer.embed import Report  # noqa: E402
from indexer.sources import close_pdfs, load_image, render_pdf_page  # noqa: E402
from indexer.store import read_index  # noqa: E402
from tests.service_fixtures import SERVER_ENV  # noqa: E402
from tests.test_indexer import picture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_SIDE = 64  # the tiny checkpoint's tile: one tile per square picture
TEXTS = {"t0": "the cat sat on the mat", "t1": "b-trees keep their leaves at one depth",
         "t2": "quarterly revenue grew by twelve percent", "t3": "a recipe for sourdough bread"}
IMAGES = ("a.png", "sub/b.png")
PAGES = 3
EXPECTED = {*TEXTS, *IMAGES, *(f"doc.pdf#page={p}" for p in range(1, PAGES + 1))}
# The live server's limits, so that in-process truncation is the server's.
LIMITS = ["--max-tokens-text", SERVER_ENV["EMBED_MAX_TOKENS_TEXT"],
          "--max-tokens-image", SERVER_ENV["EMBED_MAX_TOKENS_IMAGE"]]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_corpus")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for seed, name in enumerate(IMAGES):
        picture((64, 64), 40 + seed).save(docs / name)
    pages = [picture((144, 144), 50 + i) for i in range(PAGES)]
    pages[0].save(docs / "doc.pdf", "PDF", save_all=True, append_images=pages[1:], resolution=72)
    with open(root / "texts.jsonl", "w") as f:
        for item_id, text in TEXTS.items():
            f.write(json.dumps({"id": item_id, "text": text}) + "\n")
    return root


def inputs(corpus: Path) -> list[str]:
    return [str(corpus / "docs"), str(corpus / "texts.jsonl")]


def direct_vectors(embedder, corpus: Path) -> dict[str, np.ndarray]:
    """Every item's vector from `Embedder.embed` itself: the reference for what the pipeline stored."""
    docs = corpus / "docs"
    ids = [*TEXTS, *IMAGES, *(f"doc.pdf#page={p + 1}" for p in range(PAGES))]
    texts = [{"text": t, "input_type": "passage"} for t in TEXTS.values()]
    images = [load_image(docs / name, MAX_SIDE) for name in IMAGES]
    images += [render_pdf_page(docs / "doc.pdf", p, MAX_SIDE) for p in range(PAGES)]
    vectors = np.concatenate([
        embedder.embed(texts, truncate="END", max_tokens=int(SERVER_ENV["EMBED_MAX_TOKENS_TEXT"])),
        embedder.embed([{"image": im, "input_type": "passage"} for im in images], truncate="END",
                       max_tokens=int(SERVER_ENV["EMBED_MAX_TOKENS_IMAGE"]))])
    return dict(zip(ids, vectors))


def lance_rows(uri: str) -> dict[str, dict]:
    table = open_table(uri).to_arrow()
    return {row["id"]: row for row in table.to_pylist()}


def assert_same_vectors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    a = np.stack([got[i] for i in sorted(expected)])
    b = np.stack([expected[i] for i in sorted(expected)])
    assert np.min(np.sum(a * b, axis=1)) >= 0.99999
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.fixture(scope="module")
def lance_index(ray_local, corpus, tiny_converted, tmp_path_factory):
    """The corpus embedded in process on Ray into LanceDB, by the command (int8 and binary forms too)."""
    uri = str(tmp_path_factory.mktemp("lance") / "corpus.lancedb")
    report = Path(uri).with_suffix(".report.json")
    rc = main(["ray", *inputs(corpus), "--output", uri, "--checkpoint", str(tiny_converted), "--dtype", "float32",
               "--max-side", str(MAX_SIDE), "--batch-size", "4", "--chunk-size", "4", "--int8", "--binary",
               *LIMITS, "--report", str(report), "--no-progress"])
    assert rc == 0
    return uri, json.loads(report.read_text())


# ---- in process, into LanceDB ---------------------------------------------------------------------------------------
def test_lance_table_holds_the_embedders_vectors(lance_index, corpus, tiny_embedder):
    uri, report = lance_index
    assert report["items"] == len(EXPECTED) and report["failed"] == 0 and report["skipped"] == 0
    assert report["texts"] == 4 and report["images"] == 2 and report["pages"] == PAGES
    assert report["embedder"] == "in-process" and report["actors"] == 1 and report["gpus_per_actor"] == 0
    assert report["parts_written"] == 3  # 9 rows, commits of 4
    assert report["index"] is None  # far below the ANN threshold: exact search

    rows = lance_rows(uri)
    assert set(rows) == EXPECTED
    assert rows["doc.pdf#page=2"]["page"] == 2 and rows["doc.pdf#page=2"]["modality"] == "image"
    assert rows["doc.pdf#page=2"]["source"] == str(corpus / "docs" / "doc.pdf")
    assert rows["sub/b.png"]["page"] is None and rows["sub/b.png"]["text"] is None
    assert rows["t2"]["text"] == TEXTS["t2"] and rows["t2"]["source"].endswith("texts.jsonl")
    vectors = {i: np.asarray(r["vector"], np.float32) for i, r in rows.items()}
    assert_same_vectors(vectors, direct_vectors(tiny_embedder, corpus))

    for i, r in rows.items():  # the server's own int8 / ubinary encodings of the stored vector
        v = vectors[i]
        np.testing.assert_array_equal(r["vector_int8"], np.rint(np.clip(v, -1, 1) * 127).astype(np.int8))
        np.testing.assert_array_equal(r["vector_binary"], np.packbits(v > 0))


def test_search_returns_the_top_pages_with_cosine_scores(lance_index, corpus, tiny_embedder, tiny_converted,
                                                         capsys):
    uri, _ = lance_index
    query = "what does the cat sit on?"
    q = tiny_embedder.embed([{"text": query, "input_type": "query"}], truncate="END")[0]
    reference = direct_vectors(tiny_embedder, corpus)
    ids = sorted(reference)
    scores = np.stack([reference[i] for i in ids]) @ q
    order = np.argsort(-scores, kind="stable")[:4]

    rc = main(["search", "--index", uri, "--checkpoint", str(tiny_converted), "-k", "4", "--json", query])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert [r["id"] for r in results] == [ids[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in results], scores[order], atol=1e-4)
    by_id = {r["id"]: r for r in results}
    for r in results:
        assert set(r) == {"rank", "score", "id", "modality", "source", "page", "text"}
    if "t0" in by_id:
        assert by_id["t0"]["text"] == TEXTS["t0"]


# ---- the HTTP path gives the same vectors ---------------------------------------------------------------------------
def test_ray_vectors_equal_the_http_indexers(lance_index, ray_local, server, corpus, tmp_path, capsys):
    uri, _ = lance_index
    http_index = tmp_path / "http.parquet"  # today's command against the live server
    assert main(["embed", *inputs(corpus), "--output", str(http_index), "--server", server.url,
                 "--max-side", str(MAX_SIDE), "--no-progress"]) == 0
    ray_http = tmp_path / "ray_http.parquet"  # Ray actors calling the same server
    report = run_ray(inputs(corpus), RayOptions(output=str(ray_http), servers=[server.url], max_side=MAX_SIDE,
                                                batch_size=4, actors=2, progress=False))
    capsys.readouterr()
    assert report.failed == 0 and report.items == len(EXPECTED) and report.embedder == "servers"

    in_process = {i: np.asarray(r["vector"], np.float32) for i, r in lance_rows(uri).items()}
    for index in (http_index, ray_http):
        ids, matrix, rest = read_index(index)
        assert_same_vectors(dict(zip(ids, matrix)), in_process)
    ids, _, rest = read_index(ray_http)  # the same Parquet layout as `embed` writes
    assert rest.column_names == ["id", "modality", "source"]


# ---- resume after a killed run --------------------------------------------------------------------------------------
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import indexer.lance as lance

    commit = lance.LanceSink._commit

    def commit_then_die(self, data):
        commit(self, data)
        if self.parts_written == 2:  # two commits made: die here, no cleanup, no finally
            os.kill(os.getpid(), signal.SIGKILL)

    lance.LanceSink._commit = commit_then_die
    from indexer.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_run_resumes_where_it_stopped(ray_local, corpus, tiny_converted, tmp_path):
    uri = str(tmp_path / "killed.lancedb")
    args = ["ray", *inputs(corpus), "--output", uri, "--checkpoint", str(tiny_converted), "--dtype", "float32",
            "--max-side", str(MAX_SIDE), "--batch-size", "2", "--chunk-size", "2", *LIMITS, "--no-progress"]
    import ray

    # The killed driver is a client of this module's Ray instance, as on a cluster: its actors go with it.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args, "--report", str(tmp_path / "r.json")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray processes it started, if any outlived it
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, out.decode(errors="replace")[-3000:]
    assert not (tmp_path / "r.json").exists()  # it never got to its report
    before = lance_rows(uri)
    assert 4 <= len(before) < len(EXPECTED)  # two commits of at least 2 rows, not everything

    report = run_ray(inputs(corpus), RayOptions(output=uri, sink="lance", checkpoint=str(tiny_converted),
                                                dtype="float32", max_side=MAX_SIDE, batch_size=2, chunk_size=2,
                                                max_tokens_text=int(SERVER_ENV["EMBED_MAX_TOKENS_TEXT"]),
                                                max_tokens_image=int(SERVER_ENV["EMBED_MAX_TOKENS_IMAGE"]),
                                                progress=False))
    assert report.skipped == len(before) and report.items == len(EXPECTED) - len(before) and report.failed == 0
    table = open_table(uri).to_arrow()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == EXPECTED
    again = lance_rows(uri)
    for i, row in before.items():  # what the killed run stored is kept as it was
        np.testing.assert_array_equal(again[i]["vector"], row["vector"])


# ---- pieces, without Ray ---------------------------------------------------------------------------------------------
def test_preparing_fails_one_unreadable_file_alone(corpus, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = pa.Table.from_pylist([
        {"id": "ok", "modality": "image", "source": "s", "location": str(corpus / "docs" / "a.png")},
        {"id": "bad", "modality": "image", "source": "s", "location": str(tmp_path / "broken.png")},
        {"id": "p2", "modality": "image", "source": "s", "location": str(corpus / "docs" / "doc.pdf"), "page": 2},
        {"id": "t", "modality": "text", "source": "s", "text": "hello"},
    ], schema=ROWS)
    out = prepare_batch(rows, MAX_SIDE).to_pylist()
    close_pdfs()
    assert [r["error"] is None for r in out] == [True, False, True, True]
    assert "cannot read" in out[1]["error"] and out[3]["png"] is None
    page = Image.open(__import__("io").BytesIO(out[2]["png"]))
    assert np.array_equal(np.asarray(page), np.asarray(render_pdf_page(corpus / "docs" / "doc.pdf", 1, MAX_SIDE)))


def test_uri_inputs_give_the_local_ids_and_pixels(corpus):
    opts = RayOptions(max_side=MAX_SIDE)
    local = pending_rows(inputs(corpus), opts, set(), Report(output=""))
    uris = [f"file://{p}" for p in inputs(corpus)]
    remote = pending_rows(uris, opts, {"t1"}, report := Report(output=""))
    assert report.skipped == 1
    assert sorted(remote.column("id").to_pylist()) == sorted(set(local.column("id").to_pylist()) - {"t1"})
    a = {r["id"]: r["png"] for r in prepare_batch(local, MAX_SIDE).to_pylist()}
    b = {r["id"]: r["png"] for r in prepare_batch(remote, MAX_SIDE).to_pylist()}
    close_pdfs()
    assert all(b[i] == a[i] for i in b)  # the same PNG bytes, hence the same vectors
    assert all(r["source"].startswith("file://") for r in remote.to_pylist())


def test_lance_ann_index_only_above_its_threshold(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sink = LanceSink(str(tmp_path / "t.lancedb"), chunk_size=128)
    sink.add([f"v{i}" for i in range(300)], ["image"] * 300, vectors, ["s"] * 300, pages=list(range(1, 301)))
    sink.flush()
    assert sink.parts_written == 3 and sink.ids() == {f"v{i}" for i in range(300)}
    table = open_table(str(tmp_path / "t.lancedb"))
    exact = search_vector(table, vectors[7], k=3)
    expected = np.argsort(-(vectors @ vectors[7]))[:3]
    assert [r["id"] for r in exact] == [f"v{i}" for i in expected]
    np.testing.assert_allclose([r["score"] for r in exact], (vectors @ vectors[7])[expected], atol=1e-5)

    assert build_index(table, min_rows=1000) is None and not table.list_indices()
    built = build_index(table, min_rows=200)
    assert built is not None and built["type"] == "IVF_PQ" and len(table.list_indices()) == 1
    ann = search_vector(table, vectors[7], k=3)  # re-ranked on the full vectors: the exact neighbours
    assert [r["id"] for r in ann][0] == "v7" and abs(ann[0]["score"] - 1.0) < 1e-5
