"""Building blocks shared by the vision tower and the decoder.

Norms compute their statistics in float32 whatever the compute dtype, as the reference does; the
attention softmax is float32 inside `jax.nn.dot_product_attention`.

Shape letters used across the project: B batch, T sequence, N query heads, K key/value heads,
H head dim, D model width, F MLP width, P patches, S tile side.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from model.fp8 import Dense


def linear(rngs: nnx.Rngs, d_in: int, d_out: int, *, bias: bool, dtype, param_dtype) -> Dense:
    """`nnx.Linear` (params `kernel` [in, out], `bias`), which `model.fp8.quantize` can turn into an FP8 product
    after loading."""
    return Dense(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with float32 statistics; params `scale`, `bias`."""

    def __init__(self, features: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm: float32 statistics, then `scale * x` in the compute dtype (as transformers does)."""

    def __init__(self, features: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None,
              implementation: str | None) -> jax.Array:
    """Bidirectional attention; `lengths` [B] masks padded keys (right padding). Grouped-query when K < N.

    q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]. implementation: "cudnn" or "xla" (jax's kernels),
    "blocked" (one head at a time, for CPUs), None for the backend's best.
    """
    implementation = implementation or default_attention(q.shape[1], q.dtype, q.shape[-1])
    if implementation == "blocked":
        return blocked_attention(q, k, v, lengths)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


ATTENTION_KERNELS = ("cudnn", "xla", "blocked")

# Below this length the fused kernel's [B, N, T, T] scores fit in cache and its single call beats a loop.
_BLOCKED_MIN_LENGTH = 256


def default_attention(length: int, dtype, head_dim: int = 64) -> str:
    """The kernel when none was chosen at load time (`choose_attention`): the blocked loop for long inputs on CPUs,
    XLA's kernel otherwise. Called while a bucket is traced, so it probes nothing: cuDNN is only used when
    `choose_attention` ran it concretely first."""
    if jax.default_backend() == "gpu":
        return "xla"
    return "blocked" if length >= _BLOCKED_MIN_LENGTH else "xla"


def choose_attention(requested: str | None, dtype, head_dim: int, backend: str | None = None) -> str | None:
    """The attention kernel of one tower, chosen once when the network is loaded, outside any traced code.

    `requested` (configuration) wins. On GPUs with 16-bit inputs: cuDNN's fused kernel if a concrete run of it
    succeeds for this head size, else XLA's (with one log line). None elsewhere: CPUs pick per length when traced.
    """
    if requested:
        return requested
    if (backend or jax.default_backend()) != "gpu":
        return None
    if jnp.dtype(dtype).itemsize == 2 and cudnn_supports(head_dim, jnp.dtype(dtype).name):
        return "cudnn"
    return "xla"


def _cudnn_attention_probe(head_dim: int, dtype: str) -> None:
    """One small cuDNN attention call, run to completion (raises where cuDNN cannot run it)."""
    with jax.ensure_compile_time_eval():  # concrete even if reached while tracing: a tracer would prove nothing
        x = jnp.zeros((1, 64, 2, head_dim), dtype)
        jax.block_until_ready(jax.nn.dot_product_attention(
            x, x, x, key_value_seq_lengths=jnp.array([40], jnp.int32), implementation="cudnn"))


@functools.lru_cache(maxsize=None)
def cudnn_supports(head_dim: int, dtype: str) -> bool:
    """Whether cuDNN's fused attention runs for this head size here (it depends on the cuDNN and GPU versions)."""
    try:
        _cudnn_attention_probe(head_dim, dtype)
        return True
    except Exception as e:  # not built with cuDNN, or an unsupported shape: XLA's kernel still works
        logging.getLogger(__name__).warning("cuDNN attention unavailable for head_dim %d (%s): using XLA's", head_dim, e)
        return False


# Heads computed per step of the blocked loop: 2 was the fastest step on a CPU; larger steps spill the [T, T]
# scores out of cache again, which is what the blocked loop avoids (XLA:CPU's fused kernel materialises them all).
_HEADS_PER_STEP = 2


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Attention one (row, head) at a time, so the [T, T] scores stay in cache: XLA:CPU's fused kernel
    materialises all of [B, N, T, T] and is memory-bound. Softmax in float32."""
    b, t, n, h = q.shape
    group = n // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, t, h)  # noqa: E731  [B·N, T, H]
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    key_lengths = jnp.repeat(lengths, n)  # [B·N]

    def one(args):
        qi, ki, vi, length = args
        scores = jnp.einsum("th,sh->ts", qi, ki, preferred_element_type=jnp.float32) * (h ** -0.5)
        scores = jnp.where(jnp.arange(t)[None, :] < length, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(vi.dtype)
        return probs @ vi

    out = jax.lax.map(one, (flat(q), flat(k), flat(v), key_lengths), batch_size=_HEADS_PER_STEP)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)
