"""The engine: bucket plan, packing under budgets, warm-up, zero compilations after ready, per-item failures."""

import io

import numpy as np
import pytest
from PIL import Image

from engine import BucketPlan, Engine, EngineConfig, EngineItem
from engine.buckets import length_buckets


def png(width, height, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_length_buckets_grow_by_at_most_half_and_end_at_the_limit():
    buckets = length_buckets(10240)
    assert buckets[0] == 16 and buckets[-1] == 10240
    assert buckets[:8] == (16, 24, 32, 48, 64, 96, 128, 192) and 512 in buckets and 8192 in buckets
    assert all(b % 8 == 0 for b in buckets)
    assert all(b2 / b1 <= 1.5 for b1, b2 in zip(buckets, buckets[1:]))


def test_plan_respects_the_token_budget():
    plan = BucketPlan(max_length=10240, max_batch_tokens=16384, max_rows=64, max_tiles=8, min_image_length=270)
    for rows, length in plan.text_shapes() + plan.image_shapes():
        assert rows == 1 or rows * length <= 16384
        assert rows <= 64
    assert all(length >= 270 for _, length in plan.image_shapes())
    assert all(rows <= 8 for rows, _ in plan.image_shapes())
    assert plan.length_for(17) == 24 and plan.length_for(25) == 32 and plan.rows_for(5, 32) == 8 and plan.tiles_for(5) == 8


@pytest.fixture(scope="module")
def engine(tiny_embedder):
    engine = Engine(tiny_embedder, EngineConfig(max_length=160, max_batch_tokens=512, max_rows=32, max_tiles=8))
    engine.warmup()
    yield engine
    engine.close()


def test_warmup_compiles_every_bucket_once(engine):
    assert engine.ready
    assert engine.stats.compilations == len(engine.bucket_keys()) == len(set(engine.bucket_keys()))


def mixed_items(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta page chart table figure scan".split()
    items = []
    for i in range(n):
        kind = rng.integers(0, 4)
        text = " ".join(rng.choice(words, int(rng.integers(1, 40))))
        size = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        if kind == 0:
            items.append(EngineItem(text=text, input_type="query"))
        elif kind == 1:
            items.append(EngineItem(text=text, input_type="passage"))
        elif kind == 2:
            items.append(EngineItem(image=png(*size, seed=i)))
        else:
            items.append(EngineItem(text=text[:80], image=png(*size, seed=i)))
    return items


def as_dict(item):
    image = Image.open(io.BytesIO(item.image)) if item.image is not None else None
    return {"text": item.text, "image": image, "input_type": item.input_type}


def test_vectors_equal_the_embedders_and_nothing_compiles_after_ready(engine, tiny_embedder):
    items = mixed_items(40)
    results = engine.embed(items)
    expected = tiny_embedder.embed([as_dict(i) for i in items])
    for got, want in zip(results, expected):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, atol=2e-5)
    for seed in range(1, 4):  # other mixes, other pass shapes
        engine.embed(mixed_items(int(np.random.default_rng(seed).integers(1, 30)), seed=seed))
    assert engine.stats.compilations_after_ready == 0


def test_token_ids_path_matches_text_path(engine, tiny_embedder):
    image = png(120, 90, seed=7)
    tiles = tiny_embedder.num_tiles(120, 90)
    ids = tiny_embedder.prompter.encode("a caption", tiles, "passage")
    by_ids, by_text = engine.embed([EngineItem(token_ids=ids.tolist(), image=image),
                                    EngineItem(text="a caption", image=image)])
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)


def test_a_bad_input_fails_only_its_own_slot(engine):
    items = [EngineItem(text="fine", input_type="query"), EngineItem(image=b"not an image"),
             EngineItem(text="x " * 400, input_type="query", max_tokens=50),  # too long, NONE truncation
             EngineItem(token_ids=[1, 2, 10**9]), EngineItem(image=png(64, 64), input_type="passage"),
             EngineItem(text="y " * 400, input_type="passage")]  # longer than the engine's longest bucket
    results = engine.embed(items)
    assert isinstance(results[0], np.ndarray) and isinstance(results[4], np.ndarray)
    assert all(isinstance(r, Exception) for r in results[1:4] + results[5:])
    assert "exceeds maximum allowed token size 50" in str(results[2])
    assert "exceeds maximum allowed token size 160" in str(results[5])


def test_image_passes_get_the_exact_length_of_an_image_alone():
    """The real model's one-tile image is 265 tokens: a 272 bucket, not 384 (45% padding); 7 tiles: 1801 -> 1808."""
    plan = BucketPlan(max_length=10240, max_batch_tokens=16384, max_rows=64, max_tiles=8, min_image_length=265,
                      tokens_per_tile=256, max_tiles_per_image=7)
    assert {272, 528, 784, 1040, 1296, 1552, 1808} <= set(plan.image_lengths)
    assert set(plan.lengths) - {n for n in plan.lengths if n < 265} <= set(plan.image_lengths)  # and the general ones
    assert plan.length_for(265, image=True) == 272 and plan.length_for(265) == 384
    assert plan.length_for(1801, image=True) == 1808 and plan.length_for(1809, image=True) == 2048
    assert plan.length_for(300, image=True) == 384  # an image with a caption: the general buckets
    assert {length for _, length in plan.image_shapes()} == set(plan.image_lengths)
    assert not (set(plan.image_lengths) - set(plan.lengths)) & {length for _, length in plan.text_shapes()}


def test_passes_are_sorted_by_length_and_fit_their_buckets(engine, tiny_embedder):
    items = mixed_items(30, seed=9)
    prepared = {i: engine.prepare(item) for i, item in enumerate(items)}
    passes = engine.pack(prepared)
    seen = sorted(i for _, members in passes for i in members)
    assert seen == list(range(len(items)))
    for image, members in passes:
        lengths = [prepared[i].num_tokens for i in members]
        assert lengths == sorted(lengths)
        assert all((prepared[i].num_tiles > 0) == image for i in members)
        length = engine.plan.length_for(max(lengths), image)
        assert len(members) <= engine.plan.row_cap(length, image)
        assert sum(prepared[i].num_tiles for i in members) <= engine.plan.max_tiles


def test_packing_does_not_pad_short_inputs_to_long_ones(engine, tiny_embedder):
    short = [EngineItem(text="tiny query", input_type="query")] * 6
    long = [EngineItem(text="word " * 40, input_type="passage")] * 4
    prepared = {i: engine.prepare(item) for i, item in enumerate(short + long)}
    passes = engine.pack(prepared)
    assert [sorted(m) for _, m in passes] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    computed = sum(engine.plan.rows_for(len(m), engine.plan.length_for(max(prepared[i].num_tokens for i in m)))
                   * engine.plan.length_for(max(prepared[i].num_tokens for i in m)) for _, m in passes)
    real = sum(p.num_tokens for p in prepared.values())
    assert real / computed > 0.6


def reference_pack(plan, overhead, prepared):
    """The packing rule written plainly: the least (padded rows × length + a cost per pass) over contiguous passes
    of the length-sorted inputs, within the row and tile budgets; ties go to the shorter last pass."""
    passes = []
    for image in (False, True):
        order = sorted((i for i, p in prepared.items() if (p.num_tiles > 0) == image),
                       key=lambda i: prepared[i].num_tokens)
        best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            length, used = plan.length_for(prepared[order[j - 1]].num_tokens, image), 0
            for i in range(j - 1, max(j - plan.row_cap(length, image), 0) - 1, -1):
                used += prepared[order[i]].num_tiles
                if used > plan.max_tiles:
                    break
                cost = best[i] + plan.rows_for(j - i, length, image) * length + overhead
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        j, found = len(order), []
        while j:
            found.append((image, order[cut[j]:j]))
            j = cut[j]
        passes += reversed(found)
    return passes


@pytest.mark.parametrize("seed", range(6))
def test_packing_equals_the_plain_rule(engine, seed):
    from model.batching import PreparedInput

    rng = np.random.default_rng(seed)
    per_tile = engine.embedder.config.tokens_per_tile
    prepared = {}
    for i in range(int(rng.integers(1, 120))):
        tiles = int(rng.integers(0, 5)) if rng.random() < 0.4 else 0
        n = int(rng.integers(1, 160 - tiles * per_tile)) + tiles * per_tile if tiles * per_tile < 150 else 150
        prepared[i] = PreparedInput(np.zeros(min(n, 160), np.int32),
                                    np.zeros((tiles, 1, 1, 3), np.uint8) if tiles else None)
    assert engine.pack(prepared) == reference_pack(engine.plan, engine.config.pass_overhead_tokens, prepared)


def small_engine(embedder):
    return Engine(embedder, EngineConfig(max_length=64, max_batch_tokens=128, max_rows=2, max_tiles=1))


def test_a_warm_start_loads_stored_programs_instead_of_compiling(tiny_embedder, tiny_converted, tmp_path,
                                                                 monkeypatch, caplog):
    """The second engine loads every bucket's executable; one of another dtype, or a damaged file, compiles."""
    import engine.compilation_cache as compilation_cache
    from model import Embedder

    monkeypatch.setattr(compilation_cache, "_program_dir", tmp_path / "programs")
    items = [EngineItem(text="a short query", input_type="query"), EngineItem(image=png(40, 40), input_type="passage"),
             EngineItem(text="alpha beta " * 4, input_type="passage")]
    first = small_engine(tiny_embedder)
    first.warmup()
    keys = first.bucket_keys()
    assert first.stats.compilations == len(keys) and first.stats.programs_loaded == 0
    [store] = [p for p in (tmp_path / "programs").iterdir()]
    assert len(list(store.glob("*.exe"))) == len(keys)
    expected = first.embed(items)

    second = small_engine(tiny_embedder)
    second.warmup()
    assert second.stats.compilations == 0 and second.stats.programs_loaded == len(keys)
    assert all(isinstance(v, np.ndarray) for v in expected), expected
    for a, b in zip(second.embed(items), expected):
        np.testing.assert_array_equal(a, b)

    bf16 = small_engine(Embedder(tiny_converted, dtype="bfloat16"))
    assert bf16._programs.directory != second._programs.directory
    assert bf16._executable(keys[0]) is not None and bf16.stats.compilations == 1

    (store / second._programs.file_name(keys[0])).write_bytes(b"not an executable")
    third = small_engine(tiny_embedder)
    with caplog.at_level("WARNING", logger="engine.programs"):
        third._executable(keys[0])
    assert third.stats.compilations == 1 and "unusable" in caplog.text
    for engine in (first, second, bf16, third):
        engine.close()


class CompileLog:
    def __init__(self):
        self.calls = []

    def on_compile(self, kind, seconds, after_ready):
        self.calls.append((kind, after_ready))

    def on_pass(self, *args, **kwargs):
        pass


def test_ready_early_serves_any_shape_correctly_and_counts_what_it_compiled_late(tiny_embedder, monkeypatch):
    config = EngineConfig(max_length=64, max_batch_tokens=128, max_rows=4, max_tiles=2, ready_early=True)
    items = [EngineItem(text="a short query", input_type="query"), EngineItem(text="alpha " * 8, input_type="passage"),
             EngineItem(image=png(40, 40), input_type="passage"),
             EngineItem(image=png(50, 30, 1), input_type="passage")]
    full = Engine(tiny_embedder, EngineConfig(max_length=64, max_batch_tokens=128, max_rows=4, max_tiles=2))
    full.warmup()
    expected = full.embed(items)
    assert all(isinstance(v, np.ndarray) for v in expected), expected

    # The background warm-up held back: a batch of several inputs compiles its bucket when it needs it.
    monkeypatch.setattr(Engine, "_compile_rest", lambda self, keys: None)
    observer = CompileLog()
    early = Engine(tiny_embedder, config, observer=observer)
    early.warmup()
    assert early.ready and set(early._compiled) == set(early.early_keys()) < set(early.bucket_keys())
    assert all(k[1] == 1 for k in early.early_keys() if k[0] != "vision")
    for a, b in zip(early.embed(items), expected):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert len([c for c in observer.calls if c[1]]) == early.stats.compilations_after_ready >= 1
    early.close()

    # With it: every bucket ends up compiled, none of them counted as a miss.
    monkeypatch.undo()
    observer = CompileLog()
    background = Engine(tiny_embedder, config, observer=observer)
    background.warmup()
    assert background.wait_warm(timeout=600)
    assert background.stats.compilations == len(background.bucket_keys())
    assert background.stats.compilations_after_ready == 0 and not [c for c in observer.calls if c[1]]
    for a, b in zip(background.embed(items), expected):
        np.testing.assert_allclose(a, b, atol=2e-6)
    for engine in (full, background):
        engine.close()
