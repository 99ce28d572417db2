"""FP8 (e4m3) matrix products for the linear layers of the vision tower and the decoder.

`Dense` is `nnx.Linear` (params `kernel` [in, out], `bias` [out]) that `quantize` can turn, in place and after the
weights are loaded, into an FP8 product:

    weight        [..., out, in]  float8_e4m3fn   the kernel transposed, divided by its scale and rounded
    weight_scale  [..., out]      float32         per output channel (or [..., 1]: one per tensor)
    input_scale   [..., 1]        float32         static activation scale (absent: dynamic, one per token)
    bias          [..., out]      compute dtype

`...` is empty for a single layer and [L] for layers stacked on a leading axis: everything is written against the
last two axes of the kernel. Names and layout are those of TensorRT Model Optimizer's Hugging Face export
(`weight` [out, in] in e4m3 with `weight_scale`, `input_scale`); [out, in] is also the layout cuBLASLt's FP8 kernels
read without a transpose (both operands contracted on their minor axis).

A product: x is scaled into e4m3's range (x / s_x, s_x = amax / 448 per token, or the static scale), rounded to
e4m3, multiplied with the e4m3 weight accumulating in float32 (`preferred_element_type`), then rescaled by
s_x · weight_scale and the bias added in float32. Norms, softmax, pooling and the normalisation are untouched:
they run as in the bfloat16 model.

On GPUs of compute capability ≥ 8.9 (Ada, Hopper, Blackwell) XLA runs the e4m3 product on the FP8 tensor cores;
on a CPU it is emulated (correct but slow), which is what lets the accuracy tests run anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Iterable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
MIN_COMPUTE_CAPABILITY = (8, 9)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What is quantised and how.

    weight: "channel" (one scale per output channel) or "tensor" (one per matrix).
    activation: "token" (dynamic: one scale per token, from its own amax; needs no calibration) or "static"
      (one scale per matrix input, from calibration: `input_amax`).
    product_dtype: what the e4m3 product returns before rescaling. Accumulation is float32 either way; "bfloat16"
      halves the product's output traffic on a GPU at the cost of one bfloat16 rounding before the scales.
    prefixes: the parameter paths whose `Dense` layers are quantised. The projector (`mlp1`) and the patch
      embedding (a convolution) stay in the compute dtype: together they are ~1% of an image's FLOPs, and `mlp1`
      writes the image tokens straight into the decoder's input.
    """

    weight: Literal["channel", "tensor"] = "channel"
    activation: Literal["token", "static"] = "token"
    product_dtype: Literal["float32", "bfloat16"] = "float32"
    prefixes: tuple[str, ...] = ("vision_model.encoder.", "language_model.layers.")
    input_amax: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.weight not in ("channel", "tensor"):
            raise ValueError(f"weight scaling must be 'channel' or 'tensor', got {self.weight!r}")
        if self.activation not in ("token", "static"):
            raise ValueError(f"activation scaling must be 'token' or 'static', got {self.activation!r}")
        if self.product_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"product_dtype must be 'float32' or 'bfloat16', got {self.product_dtype!r}")
        if self.activation == "static" and self.input_amax is None:
            raise ValueError("static activation scales need input_amax from `calibrate`")


# Per-channel weights, per-token activations. On the accuracy benchmark (bench/fp8_accuracy.py) per-channel weights
# beat per-tensor ones, and static activation scales did no better than per-token ones beyond the spread between
# inputs; per-token scales need no calibration data and cannot saturate on inputs unlike the calibration set.
SERVING = Recipe()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static part of a quantised layer (held in the graph definition, not in the state)."""

    per_channel: bool
    static_input: bool
    product_dtype: str


class Dense(nnx.Linear):
    """`nnx.Linear`, plus an FP8 form made by `quantize` (see the module docstring for its parameters)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        layout: _Layout | None = getattr(self, "fp8", None)
        observe = getattr(self, "observe", None)
        if observe is not None:
            jax.debug.callback(_record_amax, observe, jnp.max(jnp.abs(x.astype(jnp.float32))), ordered=True)
        if layout is None:
            return super().__call__(x)
        bias = self.bias[...] if self.bias is not None else None
        input_scale = self.input_scale[...] if layout.static_input else None
        return fp8_linear(x, self.weight[...], self.weight_scale[...], input_scale, bias,
                          out_dtype=self.dtype or x.dtype, product_dtype=jnp.dtype(layout.product_dtype))

    def quantize(self, recipe: Recipe, input_amax: np.ndarray | None = None) -> None:
        """Replace `kernel` by its e4m3 form and scales, in place. input_amax [...]: static calibration."""
        kernel = self.kernel[...]
        weight, weight_scale = quantize_kernel(kernel, per_channel=recipe.weight == "channel")
        static = recipe.activation == "static"
        del self.kernel
        self.weight = nnx.Param(weight)
        self.weight_scale = nnx.Param(weight_scale)
        if static:
            amax = jnp.asarray(input_amax, jnp.float32).reshape(*kernel.shape[:-2], 1)
            self.input_scale = nnx.Param(jnp.where(amax > 0, amax / E4M3_MAX, 1.0))
        self.fp8 = _Layout(per_channel=recipe.weight == "channel", static_input=static,
                           product_dtype=recipe.product_dtype)


@functools.partial(jax.jit, static_argnames="per_channel")
def quantize_kernel(kernel: jax.Array, per_channel: bool) -> tuple[jax.Array, jax.Array]:
    """kernel [..., in, out] -> (weight [..., out, in] e4m3, scale [..., out] or [..., 1] float32), so that
    weight · scale ≈ kernelᵀ. The scale maps each channel's (or the matrix's) largest |w| to e4m3's largest
    value."""
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)  # [..., out, in]
    amax = jnp.max(jnp.abs(w), axis=-1) if per_channel else jnp.max(jnp.abs(w), axis=(-2, -1))[..., None]
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)  # an all-zero row keeps scale 1 (and stays zero)
    weight = jnp.clip(w / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return weight, scale


def quantize_activations(x: jax.Array, input_scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (e4m3 [..., in], scale [..., 1] per token, or the static [1]). Static scales saturate."""
    x32 = x.astype(jnp.float32)
    if input_scale is None:
        amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
        scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    else:
        scale = input_scale.astype(jnp.float32)
    return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def fp8_linear(x: jax.Array, weight: jax.Array, weight_scale: jax.Array, input_scale: jax.Array | None,
               bias: jax.Array | None, *, out_dtype, product_dtype=jnp.float32) -> jax.Array:
    """x [..., in] · weight [out, in] (e4m3) -> [..., out] in `out_dtype`, accumulated in float32."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    xq, x_scale = quantize_activations(x.reshape(-1, d_in), input_scale)  # [M, in], [M, 1] or [1]
    y = jax.lax.dot_general(xq, weight, (((1,), (1,)), ((), ())), preferred_element_type=product_dtype)  # [M, out]
    y = y.astype(jnp.float32) * x_scale * weight_scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype).reshape(*lead, weight.shape[0])


# ---- the whole network --------------------------------------------------------------------------------------------
def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _targets(model: nnx.Module, prefixes: tuple[str, ...]) -> list[tuple[str, Dense]]:
    return [(_path(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Dense) and _path(path).startswith(prefixes)]


def quantize(graphdef: nnx.GraphDef, state: nnx.State, recipe: Recipe = SERVING, *,
             param_dtype=jnp.bfloat16) -> tuple[nnx.GraphDef, nnx.State]:
    """A loaded network with the `Dense` layers under `recipe.prefixes` in FP8, every other floating parameter
    (norms, embeddings, biases, projector, patch embedding) cast to `param_dtype`. Quantise from float32 weights
    where the checkpoint has them: the e4m3 rounding then happens once."""
    model = nnx.merge(graphdef, state)
    targets = _targets(model, recipe.prefixes)
    if not targets:
        raise ValueError(f"no linear layer under {recipe.prefixes}: nothing to quantise")
    for name, dense in targets:
        amax = None
        if recipe.activation == "static":
            if name not in recipe.input_amax:
                raise ValueError(f"no calibrated input amax for {name}: calibrate on inputs that reach every layer "
                                 "(text and images)")
            amax = recipe.input_amax[name]
        dense.quantize(recipe, amax)
    graphdef, state = nnx.split(model)

    flat = []
    for path, variable in nnx.to_flat_state(state):
        value = variable[...]
        if path[-1] not in ("weight", "weight_scale", "input_scale") and jnp.issubdtype(value.dtype, jnp.floating):
            variable = variable.replace(value.astype(param_dtype))
        flat.append((path, variable))
    return graphdef, nnx.from_flat_state(flat)


_AMAX: dict[str, list[float]] | None = None


def _record_amax(name: str, amax) -> None:
    if _AMAX is not None:
        _AMAX.setdefault(name, []).append(float(amax))


def calibrate(graphdef: nnx.GraphDef, state: nnx.State, run: Callable[[Callable], None],
              prefixes: tuple[str, ...] = Recipe.prefixes) -> dict[str, np.ndarray]:
    """Static activation scales: the largest |input| each quantisable layer sees while `run(forward)` calls
    `forward(batch)` on calibration batches (`model.network.Batch`). Returns {layer path: amax [...]}, one value
    per layer of a stack.

    Layers inside a scan are called once per layer in order; ordered callbacks keep that order, so the k-th value
    recorded for a stacked layer belongs to layer k mod L.
    """
    global _AMAX
    model = nnx.merge(graphdef, state)
    layers = {}
    for name, dense in _targets(model, prefixes):
        dense.observe = name
        layers[name] = tuple(dense.kernel.shape[:-2])
    observing, observed_state = nnx.split(model)
    forward = jax.jit(lambda s, batch: nnx.merge(observing, s)(batch))
    _AMAX = {}
    try:
        run(lambda batch: jax.block_until_ready(forward(observed_state, batch)))
        jax.effects_barrier()
        seen = _AMAX
    finally:
        _AMAX = None
    out = {}
    for name, lead in layers.items():
        values = np.asarray(seen.get(name, []), np.float32)
        count = int(np.prod(lead)) if lead else 1
        if not len(values) or len(values) % count:
            raise ValueError(f"calibration never reached {name} (or reached it {len(values)} times for {count} "
                             "layers): calibrate on text and image inputs")
        out[name] = values.reshape(-1, *lead).max(axis=0) if lead else values.max(keepdims=False)
    return out


def calibrate_embedder(embedder, items: Iterable) -> dict[str, np.ndarray]:
    """`calibrate` on an unquantised `model.Embedder`, one input per pass (padding to 32 tokens, as served)."""
    prepared = [embedder.prepare(item) for item in items]

    def run(forward):
        for p in prepared:
            tiles = 1 << max(p.num_tiles - 1, 0).bit_length() if p.num_tiles else 0
            forward(embedder.collate([p], length=-(-p.num_tokens // 32) * 32, rows=1, tiles=tiles))

    return calibrate(embedder.graphdef, embedder.state, run)


# ---- where it can run ---------------------------------------------------------------------------------------------
class Fp8Unsupported(ValueError):
    pass


def check_device(device: jax.Device | None = None) -> str:
    """Refuse a device that cannot run FP8 products; returns "native" or "emulated" (CPU, for tests)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        log.warning("fp8 on CPU: XLA emulates the e4m3 products (accurate, slower than float32); use it for "
                    "accuracy checks, serve FP8 on a GPU of compute capability >= 8.9")
        return "emulated"
    capability = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(v) for v in str(capability).split(".")[:2])
    except ValueError:
        major = minor = None
    if device.platform != "gpu" or major is None:
        raise Fp8Unsupported(f"EMBED_DTYPE=fp8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper, "
                             f"Blackwell); this device is {device.device_kind!r} on {device.platform!r}: use "
                             "EMBED_DTYPE=bfloat16")
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        raise Fp8Unsupported(f"EMBED_DTYPE=fp8 needs FP8 tensor cores (compute capability >= 8.9: L4, L40S, H100, "
                             f"H200, Blackwell); {device.device_kind} has {major}.{minor}: use EMBED_DTYPE=bfloat16")
    return "native"


def quantized_layers(state: nnx.State) -> Iterable[str]:
    """Paths of the layers held in e4m3 (for logs and tests)."""
    for path, v in nnx.to_flat_state(state):
        if path[-1] == "weight" and v[...].dtype == E4M3:
            yield _path(path[:-1])
