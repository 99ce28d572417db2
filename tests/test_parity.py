"""Parity with the independent PyTorch reference (tests/reference.py), block by block and end to end.

float32: cosine ≥ 0.99999 for every input; bfloat16: ≥ 0.999. The reference shares no code with model/.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from model import Embedder
from model.network import Batch, normalize_pixels
from model.projector import pixel_shuffle
from model.weights import network_for_inspection
from tests.reference import ReferenceModel, tiles_to_tensor
from tests.reference import tile_image as reference_tiles

F32_COSINE, BF16_COSINE = 0.99999, 0.999


def cosine(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def picture(width, height, seed=0):
    """A smooth image with structure at several scales (resizing noise alone would hide tiling bugs less well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * f1 * 6.28 + rng.uniform(0, 6)) * np.cos(y * f2 * 6.28) for f1, f2 in rng.uniform(1, 9, (3, 2))]
    base = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    return Image.fromarray(base.astype(np.uint8))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceModel.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def network(tiny_embedder):
    return network_for_inspection(tiny_embedder.graphdef, tiny_embedder.state)


def long_text(words, seed=0):
    rng = np.random.default_rng(seed)
    vocab = "the of index table chart page scanned vector retrieval query passage model image text figure".split()
    return " ".join(rng.choice(vocab, words))


IMAGES = {  # the tiny checkpoint's tiles are 64 px: these cover 1, 3+1, 4+1 and 6+1 tiles
    "square": (300, 300), "wide_3to1": (600, 200), "tall_1to4": (100, 400), "tiny_20": (20, 20), "large": (3000, 2000),
}


def items():
    cases = {
        "query": {"text": "how are b-trees balanced?", "image": None, "input_type": "query"},
        "passage": {"text": long_text(60), "image": None, "input_type": "passage"},
        "long_passage": {"text": long_text(2200, seed=1), "image": None, "input_type": "passage"},
        "image_text": {"text": "Figure 3: throughput by batch size", "image": picture(640, 480, 9), "input_type": "passage"},
    }
    for i, (name, size) in enumerate(IMAGES.items()):
        cases[f"image_{name}"] = {"text": None, "image": picture(*size, seed=i), "input_type": "passage"}
    return cases


CASES = items()


# ------------------------------------------------------------------------------------------------ blocks
def test_pixels_match_the_reference_processor_exactly(tiny_embedder):
    image = picture(600, 200)
    ours = np.asarray(normalize_pixels(jnp.asarray(tiny_embedder.tiles(image)), jnp.float32))
    theirs = tiles_to_tensor(reference_tiles(image, 64)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ours, theirs)


def test_vision_tower(network, reference):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    x = normalize_pixels(jnp.asarray(pixels), jnp.float32)
    ours = np.asarray(network.vision_model(x))
    theirs = reference.vision(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).detach().numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert cosine(ours, theirs).min() >= F32_COSINE


def test_pixel_shuffle_matches_internvl():
    x = np.random.default_rng(0).normal(size=(2, 1024, 8)).astype(np.float32)
    from tests.reference import pixel_shuffle as ref_shuffle

    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 2)), ref_shuffle(torch.from_numpy(x)).numpy())


def test_projector(network, reference):
    x = np.random.default_rng(1).normal(size=(2, 4, 128)).astype(np.float32)
    ours = np.asarray(network.mlp1(jnp.asarray(x)))
    theirs = reference.projector(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [(7, 3), (2100, 40)])
def test_decoder_with_padding(network, reference, lengths):
    """Includes a 2,100-token row: llama3 RoPE scaling only shows on long inputs."""
    t = max(lengths)
    embeds = np.random.default_rng(2).normal(size=(len(lengths), t, 64)).astype(np.float32)
    ours = np.asarray(network.language_model(jnp.asarray(embeds), jnp.asarray(lengths, jnp.int32)))
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    theirs = reference.decoder(torch.from_numpy(embeds), mask).detach().numpy()
    for row, n in enumerate(lengths):
        assert cosine(ours[row, :n], theirs[row, :n]).min() >= F32_COSINE
        np.testing.assert_allclose(ours[row, :n], theirs[row, :n], atol=5e-4, rtol=1e-3)


def test_image_features_spliced_in_order(network, reference, tiny_embedder):
    image = picture(600, 200, 3)
    tiles = tiny_embedder.tiles(image)
    ours = np.asarray(network.image_features(jnp.asarray(tiles))).reshape(-1, 64)
    theirs = reference.image_features(image).detach().numpy()
    assert ours.shape == theirs.shape == (4 * 4, 64)
    assert cosine(ours, theirs).min() >= F32_COSINE


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def reference_vectors(reference):
    return dict(zip(CASES, reference.embed(list(CASES.values()))))


@pytest.mark.parametrize("name", list(CASES))
def test_float32_end_to_end(tiny_embedder, reference_vectors, name):
    ours = tiny_embedder.embed([CASES[name]])[0]
    assert ours.shape == reference_vectors[name].shape
    assert abs(np.linalg.norm(ours) - 1) < 1e-5
    assert cosine([ours], [reference_vectors[name]])[0] >= F32_COSINE


def test_long_passage_really_is_long(tiny_embedder):
    assert tiny_embedder.prepare(CASES["long_passage"]).num_tokens > 2000


@pytest.fixture(scope="module")
def bf16_embedder(tiny_converted):
    return Embedder(tiny_converted, dtype="bfloat16")


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_end_to_end(bf16_embedder, reference_vectors, name):
    ours = bf16_embedder.embed([CASES[name]])[0]
    assert cosine([ours], [reference_vectors[name]])[0] >= BF16_COSINE


def test_same_vector_alone_and_in_a_batch_with_longer_inputs(tiny_embedder):
    names = list(CASES)
    together = tiny_embedder.embed([CASES[n] for n in names])
    for i, n in enumerate(names):
        alone = tiny_embedder.embed([CASES[n]])[0]
        np.testing.assert_allclose(together[i], alone, atol=2e-6)


def test_text_batches_never_run_the_vision_tower(tiny_embedder):
    e = tiny_embedder
    prepared = [e.prepare(CASES["query"])]
    text_batch = e.collate(prepared, length=32, rows=2, tiles=0)
    assert text_batch.pixels is None
    jaxpr = str(jax.make_jaxpr(e._forward)(e.state, text_batch))
    assert "conv_general_dilated" not in jaxpr
    image_batch = e.collate([e.prepare(CASES["image_square"])], length=32, rows=1, tiles=8)
    assert "conv_general_dilated" in str(jax.make_jaxpr(e._forward)(e.state, image_batch))


def test_mid_size_parity(tmp_path_factory):
    """The real widths (vision 1152 with 72-wide heads, decoder 2048 with GQA 32/8), 2 + 2 layers, 512 px tiles."""
    from conversion.convert import convert
    from conversion.random_checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("mid")
    try:  # 3 GB on disk: removed at once, not left for pytest's last three runs to pile up
        src = write_random_checkpoint(root / "hf", size="mid", seed=3, dtype="float32")
        convert(src, root / "converted", progress=False)
        embedder = Embedder(root / "converted", dtype="float32")
        cases = [
            {"text": "which chart shows revenue by quarter?", "image": None, "input_type": "query"},
            {"text": "Quarterly revenue", "image": picture(1100, 600, 5), "input_type": "passage"},
        ]
        ours = embedder.embed(cases)
        del embedder
        theirs = ReferenceModel.from_pretrained(src, dtype=torch.float32).embed(cases)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert ours.shape == (2, 2048)
    assert cosine(ours, theirs).min() >= F32_COSINE


def test_stacked_layers_run_in_order(network):
    """The scan over the stacked decoder layers is layer 0, then layer 1, … each reached as its own module."""
    from model import stacked
    from model.llama import rope_inverse_frequencies, rope_tables

    lm = network.language_model
    embeds = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 64)).astype(np.float32))
    lengths = jnp.asarray([16, 9], jnp.int32)
    cos, sin = rope_tables(rope_inverse_frequencies(lm.cfg), 16)
    x = embeds
    for i in range(stacked.num_layers(lm.layers)):
        x = stacked.layer(lm.layers, i)(x, cos, sin, lengths)
    np.testing.assert_allclose(np.asarray(lm(embeds, lengths)), np.asarray(lm.norm(x)), atol=1e-5, rtol=1e-5)
