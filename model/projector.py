"""Pixel shuffle ("v2") and the `mlp1` projector from vision width to decoder width."""

from __future__ import annotations

import jax
from flax import nnx

from model.config import ModelConfig
from model.layers import LayerNorm, linear


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """Merge each factor×factor block of patches into one token.

    x [B, P, D] on a row-major √P×√P grid -> [B, P/f², f²·D], where for f = 2
    out[i, j] = concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]), flattened row-major:
    the same order as InternVL's reshape/permute sequence with ps_version v2.
    """
    b, p, d = x.shape
    side = int(round(p**0.5))
    x = x.reshape(b, side // factor, factor, side // factor, factor, d)  # [B, i, di, j, dj, D]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, i, j, di, dj, D]
    return x.reshape(b, (side // factor) ** 2, factor * factor * d)


class Projector(nnx.Module):
    """`mlp1`: LayerNorm -> Linear -> exact GELU -> Linear (torch Sequential indices 0, 1, 3)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d_in, d_out = cfg.projector_in_features, cfg.text.hidden_size
        self.layer_norm = LayerNorm(d_in, cfg.projector_layer_norm_eps, param_dtype=param_dtype)
        self.fc1 = linear(rngs, d_in, d_out, bias=True, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = linear(rngs, d_out, d_out, bias=True, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(self.layer_norm(x)), approximate=False))
