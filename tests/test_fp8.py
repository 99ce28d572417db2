"""FP8 (e4m3) linear layers: the quantised product, stacked layers, the device check, and the accuracy of the whole
embedder against float32 on the tiny random checkpoint (the CPU emulates the e4m3 products).

The whole-model bounds are those the random checkpoint supports, not the targets for the real weights (cosine
0.999, rank-1 agreement 99%): with random Gaussian weights every matrix product is as sensitive to rounding as a
product can be (no output is a coherent sum), and e4m3's 3-bit mantissa alone costs ~0.0006 of cosine per product
(`test_one_product_is_as_accurate_as_e4m3_allows`). bench/fp8_accuracy.py measures the same things at the real
depth and takes the real checkpoint.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import Engine, EngineConfig, EngineItem
from model import Embedder, fp8
from serving.settings import Settings
from tests.test_parity import CASES, cosine, long_text, picture

# What the tiny random checkpoint gives with the served recipe (least over the parity inputs 0.9943, images;
# rank-1 agreement 90% on a 64-document corpus); a dropped or doubled scale, a transposed weight or a wrong layer
# falls far below.
TINY_COSINE = 0.99
TINY_RANK1_AGREEMENT = 0.85


# ------------------------------------------------------------------------------------------------ one product
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_quantize_kernel_layout_and_round_trip(per_channel, lead):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(*lead, 48, 40)).astype(np.float32) * rng.uniform(0.01, 2, (*lead, 1, 40))
    kernel[..., 7] = 0  # an all-zero output channel
    weight, scale = fp8.quantize_kernel(jnp.asarray(kernel), per_channel=per_channel)
    assert weight.dtype == jnp.float8_e4m3fn and weight.shape == (*lead, 40, 48)  # [..., out, in]
    assert scale.dtype == jnp.float32 and scale.shape == (*lead, 40 if per_channel else 1)
    assert float(jnp.max(jnp.abs(weight.astype(jnp.float32)))) == fp8.E4M3_MAX  # the largest |w| maps to 448
    back = np.swapaxes(np.asarray(weight, np.float32) * np.asarray(scale)[..., None], -1, -2)
    assert np.all(back[..., 7] == 0) and np.all(np.isfinite(back))
    if per_channel:  # every element within half an e4m3 step (2^-4 relative) or below its channel's subnormals
        tolerance = np.maximum(np.abs(kernel) * 2.0**-4, np.abs(kernel).max(-2, keepdims=True) * 2.0**-15)
        assert np.all(np.abs(back - kernel) <= tolerance * 1.0001)


def test_one_product_is_as_accurate_as_e4m3_allows():
    """Per-token activations and per-channel weights: each output row within e4m3's rounding of the float32 product,
    whatever the row's and the channel's magnitudes (the scales absorb them), accumulated in float32."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 64, 1024)).astype(np.float32) * rng.uniform(1e-3, 1e3, (2, 64, 1))  # rows of any size
    kernel = rng.normal(size=(1024, 512)).astype(np.float32) * rng.uniform(1e-3, 1, (1, 512))
    weight, scale = fp8.quantize_kernel(jnp.asarray(kernel), per_channel=True)
    y = np.asarray(fp8.fp8_linear(jnp.asarray(x), weight, scale, None, None, out_dtype=jnp.float32))
    exact = x @ kernel
    assert y.shape == exact.shape == (2, 64, 512)
    assert cosine(y.reshape(-1, 512), exact.reshape(-1, 512)).min() >= 0.999
    # Per-channel weights: a small channel is as accurate as a large one.
    columns = cosine(y.reshape(-1, 512).T, exact.reshape(-1, 512).T)
    assert columns.min() >= 0.998


def test_static_scale_saturates_instead_of_overflowing():
    x = jnp.asarray([[1.0, -2.0, 1000.0, 0.5]])
    q, scale = fp8.quantize_activations(x, jnp.asarray([2.0 / fp8.E4M3_MAX]))  # calibrated for |x| <= 2
    values = np.asarray(q, np.float32) * float(scale[0])
    assert np.all(np.isfinite(values)) and values[0, 2] == pytest.approx(2.0)
    assert values[0, 1] == pytest.approx(-2.0) and values[0, 3] == pytest.approx(0.5, rel=2.0**-3)


class _Block(nnx.Module):
    def __init__(self, rngs):
        from model.layers import linear

        self.up = linear(rngs, 16, 32, bias=True, dtype=jnp.float32, param_dtype=jnp.float32)
        self.down = linear(rngs, 32, 16, bias=False, dtype=jnp.float32, param_dtype=jnp.float32)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


def test_stacked_layers_get_one_scale_per_layer_and_channel():
    """Layers stacked on a leading axis (built by nnx.vmap, run by lax.scan, as a scanned tower is): the FP8 form
    has weight [L, out, in] and scales [L, out], and the scan gives what each layer quantised on its own gives."""
    layers = 3

    class Stack(nnx.Module):
        def __init__(self):
            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=0, out_axes=0)
            def build(rngs):
                return _Block(rngs)

            self.layers = build(nnx.Rngs(0))

        def __call__(self, x):
            graphdef, params = nnx.split(self.layers)
            return jax.lax.scan(lambda c, p: (nnx.merge(graphdef, p)(c), None), x, params)[0]

    stack = Stack()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16)), jnp.float32)
    graphdef, state = nnx.split(stack)
    exact = nnx.merge(graphdef, state)(x)
    one_by_one = x
    for i in range(layers):  # each layer alone, quantised alone
        lg, lp = nnx.split(stack.layers)
        block_g, block_s = nnx.split(nnx.merge(lg, jax.tree.map(lambda p: p[i], lp)))
        block_g, block_s = fp8.quantize(block_g, block_s, fp8.Recipe(prefixes=("",)), param_dtype=jnp.float32)
        one_by_one = nnx.merge(block_g, block_s)(one_by_one)
    qg, qs = fp8.quantize(graphdef, state, fp8.Recipe(prefixes=("layers.",)), param_dtype=jnp.float32)
    flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(qs)}
    assert flat["layers.up.weight"].shape == (layers, 32, 16) and flat["layers.up.weight_scale"].shape == (layers, 32)
    assert flat["layers.down.weight"].dtype == jnp.float8_e4m3fn and "layers.up.kernel" not in flat
    scanned = nnx.merge(qg, qs)(x)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(one_by_one), rtol=1e-6, atol=1e-6)
    assert cosine(np.asarray(scanned), np.asarray(exact)).min() >= 0.995  # six e4m3 products in a row

    # Static calibration through the scan: one amax per layer, in layer order.
    amax = fp8.calibrate(graphdef, state, lambda forward: forward(x), prefixes=("layers.",))
    h, expected = x, []
    for i in range(layers):
        block = nnx.merge(*nnx.split(stack.layers)[:1], jax.tree.map(lambda p: p[i], nnx.split(stack.layers)[1]))
        expected.append(float(jnp.max(jnp.abs(h))))
        h = block(h)
    assert set(amax) == {"layers.up", "layers.down"} and amax["layers.up"].shape == (layers,)
    np.testing.assert_allclose(amax["layers.up"], expected, rtol=1e-6)
    static = fp8.Recipe(prefixes=("layers.",), activation="static", input_amax=amax)
    sg, ss = fp8.quantize(graphdef, state, static, param_dtype=jnp.float32)
    assert {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(ss)}["layers.up.input_scale"].shape == (3, 1)
    assert cosine(np.asarray(nnx.merge(sg, ss)(x)), np.asarray(exact)).min() >= 0.995


# ------------------------------------------------------------------------------------------------ where it runs
def _device(platform, capability=None, kind="NVIDIA test"):
    return types.SimpleNamespace(platform=platform, compute_capability=capability, device_kind=kind)


@pytest.mark.parametrize("capability", ["8.9", "9.0", "10.0", "12.0"])
def test_fp8_runs_on_ada_hopper_and_blackwell(capability):
    assert fp8.check_device(_device("gpu", capability)) == "native"


@pytest.mark.parametrize("capability", ["7.0", "8.0", "8.6", None, "gfx942"])
def test_fp8_is_refused_without_fp8_tensor_cores(capability):
    with pytest.raises(fp8.Fp8Unsupported, match="compute capability >= 8.9.*EMBED_DTYPE=bfloat16"):
        fp8.check_device(_device("gpu", capability, kind="NVIDIA A100"))


def test_fp8_on_cpu_is_emulated_and_says_so(caplog):
    assert fp8.check_device(_device("cpu")) == "emulated"
    assert "emulates" in caplog.text


def test_settings_take_fp8():
    assert Settings.from_env({"EMBED_DTYPE": "fp8"}).dtype == "fp8"
    with pytest.raises(ValueError, match="EMBED_DTYPE"):
        Settings.from_env({"EMBED_DTYPE": "int8"})


# ------------------------------------------------------------------------------------------------ the embedder
@pytest.fixture(scope="module")
def fp8_embedder(tiny_converted):
    return Embedder(tiny_converted, dtype="fp8")


def test_only_the_towers_linear_layers_are_fp8(fp8_embedder):
    e = fp8_embedder
    quantised = set(fp8.quantized_layers(e.state))
    cfg = e.config
    # The layers are stacked (one module per kind, a leading layer axis): 6 linear layers per vision layer, 7 per
    # decoder layer, each quantised for every layer of its tower.
    assert len(quantised) == 6 + 7
    assert all(name.startswith(("vision_model.encoder.", "language_model.layers.")) for name in quantised)
    flat = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(e.state)}
    for name in quantised:
        layers = cfg.vision.num_hidden_layers if name.startswith("vision_model.") else cfg.text.num_hidden_layers
        assert flat[f"{name}.weight"].dtype == jnp.float8_e4m3fn and flat[f"{name}.weight"].shape[0] == layers
        assert flat[f"{name}.weight_scale"].shape[0] == layers
    assert flat["mlp1.fc1.kernel"].dtype == jnp.bfloat16  # the projector stays in the compute dtype
    assert flat["vision_model.embeddings.patch_embedding.kernel"].dtype == jnp.bfloat16
    assert flat["language_model.embed_tokens.embedding"].dtype == jnp.bfloat16
    assert all(flat[f"{name}.weight_scale"].dtype == jnp.float32 for name in quantised)
    assert e.dtype == "fp8" and e.compute_dtype == "bfloat16"


@pytest.fixture(scope="module")
def float32_vectors(tiny_embedder):
    return dict(zip(CASES, tiny_embedder.embed(list(CASES.values()))))


@pytest.mark.parametrize("name", list(CASES))
def test_fp8_end_to_end_against_float32(fp8_embedder, float32_vectors, name):
    ours = fp8_embedder.embed([CASES[name]])[0]
    assert abs(np.linalg.norm(ours) - 1) < 1e-5
    assert cosine([ours], [float32_vectors[name]])[0] >= TINY_COSINE


def test_fp8_through_the_engine_matches_the_python_api(fp8_embedder):
    """The engine's staged passes (image features handed between them in the compute dtype) give the same vectors."""
    engine = Engine(fp8_embedder, EngineConfig(max_length=512, max_batch_tokens=1024, max_rows=4, max_tiles=8))
    try:
        items = [CASES["image_text"], CASES["query"]]
        got = engine.embed([EngineItem(text=i["text"], image=i["image"], input_type=i["input_type"]) for i in items])
    finally:
        engine.close()
    assert cosine(np.stack(got), fp8_embedder.embed(items)).min() >= 0.9999


def test_fp8_documents_keep_bfloat16_queries_rank1(tiny_converted, fp8_embedder):
    """Retrieval: each query's best document, FP8 documents against bfloat16 queries, as with bfloat16 on both."""
    rng = np.random.default_rng(7)
    docs = [{"text": long_text(int(rng.integers(20, 60)), seed=100 + i), "input_type": "passage"} for i in range(40)]
    docs += [{"image": picture(int(rng.integers(40, 200)), int(rng.integers(40, 200)), seed=200 + i),
              "input_type": "passage"} for i in range(12)]
    queries = [{"text": " ".join(rng.choice(d["text"].split(), 6)) + "?", "input_type": "query"} for d in docs[:40]]
    bf16 = Embedder(tiny_converted, dtype="bfloat16")
    q = bf16.embed(queries)
    agreement = np.mean(np.argmax(q @ bf16.embed(docs).T, 1) == np.argmax(q @ fp8_embedder.embed(docs).T, 1))
    assert agreement >= TINY_RANK1_AGREEMENT


def test_static_activation_scales_from_calibration(tiny_embedder, tiny_converted, float32_vectors):
    calibration = [{"text": long_text(50, seed=9), "input_type": "passage"},
                   {"text": "a chart", "image": picture(500, 300, 11), "input_type": "passage"}]
    amax = fp8.calibrate_embedder(tiny_embedder, calibration)
    cfg = tiny_embedder.config
    assert len(amax) == 6 + 7  # one entry per stacked linear layer, one value per layer of its tower
    for name, a in amax.items():
        layers = cfg.vision.num_hidden_layers if name.startswith("vision_model.") else cfg.text.num_hidden_layers
        assert np.asarray(a).shape == (layers,) and np.all(np.asarray(a) > 0)
    with pytest.raises(ValueError, match="calibrat"):
        fp8.calibrate_embedder(tiny_embedder, calibration[:1])  # text only: the vision tower never runs
    static = Embedder(tiny_converted, dtype="fp8", fp8_recipe=fp8.Recipe(activation="static", input_amax=amax))
    names = ["query", "image_square"]
    got = static.embed([CASES[n] for n in names])
    assert cosine(got, np.stack([float32_vectors[n] for n in names])).min() >= TINY_COSINE
