"""SigLIP2 vision tower (so400m layout): patch conv, learned positions, pre-LN encoder, post-LN.

Module names follow transformers' `SiglipVisionModel` so conversion is a short table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import VisionConfig
from model import stacked
from model.layers import LayerNorm, attention, linear


class SiglipEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.position_embedding = nnx.Embed(cfg.num_patches, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, C] normalised -> [B, P, D]; patches in row-major order."""
        x = self.patch_embedding(pixels)  # [B, S/p, S/p, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.implementation = implementation
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, linear(rngs, d, d, bias=True, dtype=dtype, param_dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, -1)  # noqa: E731  [B, P, N, H]
        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), None, self.implementation)
        return self.out_proj(out.reshape(b, t, d))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = linear(rngs, cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = linear(rngs, cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = SiglipAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         implementation=implementation)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        # Every layer's parameters stacked on a leading axis [L, …], run by one scan (see model/stacked.py).
        self.layers = stacked.stack(
            lambda r: SiglipEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                         implementation=implementation),
            cfg.num_hidden_layers, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return stacked.scan(self.layers, x)


class SiglipVisionTower(nnx.Module):
    """`vision_model.vision_model` of the checkpoint; the unused attention-pooling head is not built."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        self.embeddings = SiglipEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = SiglipEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                     implementation=implementation)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, C] normalised, compute dtype -> last hidden state [B, P, D]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))
