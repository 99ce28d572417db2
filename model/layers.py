"""Building blocks shared by the vision tower and the decoder.

Norms compute their statistics in float32 whatever the compute dtype, as the reference does; the
attention softmax is float32 inside `jax.nn.dot_product_attention`.

Shape letters used across the project: B batch, T sequence, N query heads, K key/value heads,
H head dim, D model width, F MLP width, P patches, S tile side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def linear(rngs: nnx.Rngs, d_in: int, d_out: int, *, bias: bool, dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None, implementation) -> jax.Array:
    """Bidirectional attention; `lengths` [B] masks padded keys (right padding). Grouped-query when K < N.

    q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].
    """
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
