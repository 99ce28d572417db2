"""The Python API (`Embedder.embed`) runs through the server's engine: one packer, buckets compiled as needed, the
first bad input raised before any forward pass, and the model package importable without the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Engine, EngineConfig, EngineItem
from model import Embedder, InputTooLongError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fresh(tiny_converted):
    """An Embedder of its own, so its engine's statistics count this test's calls only."""
    embedder = Embedder(tiny_converted, dtype="float32")
    yield embedder
    embedder.close()


def test_importing_the_model_does_not_import_the_engine():
    code = "import sys, model; assert 'engine' not in sys.modules, 'model imported the engine'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_embed_compiles_only_the_buckets_it_uses(fresh):
    queries = [{"text": f"query number {i}", "input_type": "query"} for i in range(5)]
    first = fresh.embed(queries)
    engine = fresh.engine
    assert isinstance(engine, Engine) and not engine.ready  # not warmed up on the whole plan
    assert engine.stats.compilations == 1 < len(engine.bucket_keys())  # one text bucket
    again = fresh.embed(queries[::-1])
    np.testing.assert_array_equal(again, first[::-1])
    assert engine.stats.compilations == 1 and engine.stats.passes == 2


def test_embed_equals_the_engine_path(fresh, tiny_embedder):
    """The Python API and an engine configured as a server's give the same vectors for the same inputs."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    items = [{"text": "a short query", "input_type": "query"},
             {"text": "a passage " * 30, "input_type": "passage"},
             {"text": None, "image": image, "input_type": "passage"},
             {"text": "a caption", "image": image, "input_type": "passage"}]
    engine = Engine(tiny_embedder, EngineConfig.for_backend(max_length=160, max_batch_tokens=512))
    try:
        served = engine.embed([EngineItem(text=i["text"], image=i.get("image"), input_type=i["input_type"])
                               for i in items])
    finally:
        engine.close()
    ours = fresh.embed(items)
    assert ours.dtype == np.float32 and ours.shape == (4, fresh.config.embedding_size)
    np.testing.assert_allclose(ours, np.stack(served), atol=1e-5)


def test_embed_raises_the_first_bad_input_before_any_pass(fresh):
    ok = {"text": "fine", "input_type": "query"}
    too_long = {"text": "word " * 200, "input_type": "query"}
    not_an_image = {"image": b"not an image"}
    with pytest.raises(InputTooLongError, match="exceeds maximum allowed token size 50"):
        fresh.embed([ok, too_long, not_an_image], max_tokens=50)
    with pytest.raises(Image.UnidentifiedImageError):
        fresh.embed([ok, not_an_image, too_long], max_tokens=50)
    with pytest.raises(ValueError, match="input_type"):
        fresh.embed([ok, {"text": "x", "input_type": "document"}])
    with pytest.raises(ValueError, match="needs text, an image or both"):
        fresh.embed([ok, {"text": ""}])
    assert fresh.engine.stats.passes == 0
    assert len(fresh.embed([too_long], truncate="END", max_tokens=50)) == 1
    assert fresh.embed([]).shape == (0, fresh.config.embedding_size)


def test_an_input_longer_than_the_longest_bucket_is_refused(fresh):
    longest = fresh.engine.plan.lengths[-1]
    with pytest.raises(InputTooLongError, match=f"maximum allowed token size {longest}"):
        fresh.embed([{"text": "word " * (longest + 10), "input_type": "passage"}])
