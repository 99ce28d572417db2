"""Bidirectional Llama 3 decoder: GQA attention with llama3-scaled RoPE and a padding-only mask.

Module names follow transformers' `LlamaModel`; q/k weights keep its rotate-half RoPE layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import TextConfig
from model import stacked
from model.layers import RMSNorm, attention, linear


def rope_inverse_frequencies(cfg: TextConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with Llama 3 scaling, computed as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq).astype(np.float32)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled).astype(np.float32)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(inv_freq: np.ndarray, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, H] in float32 for positions 0..T-1 (right padding keeps every input at 0..L-1)."""
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]; rotate-half layout."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.implementation = cfg.num_attention_heads, cfg.num_key_value_heads, implementation
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(rngs, d, self.num_heads * h, **kw)
        self.k_proj = linear(rngs, d, self.num_kv_heads * h, **kw)
        self.v_proj = linear(rngs, d, self.num_kv_heads * h, **kw)
        self.o_proj = linear(rngs, self.num_heads * h, d, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, lengths: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, -1), cos, sin)  # [B, T, N, H]
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, -1), cos, sin)  # [B, T, K, H]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, -1)
        out = attention(q, k, v, lengths, self.implementation)
        return self.o_proj(out.reshape(b, t, -1))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = linear(rngs, cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = linear(rngs, cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = linear(rngs, cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        implementation=implementation)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, lengths):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    """`language_model` of the checkpoint (no lm_head)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        self.dtype = dtype
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        # Every layer's parameters stacked on a leading axis [L, …], run by one scan (see model/stacked.py).
        self.layers = stacked.stack(
            lambda r: LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                        implementation=implementation),
            cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, embeds: jax.Array, lengths: jax.Array) -> jax.Array:
        """embeds [B, T, D] (right-padded), lengths [B] -> final-normed hidden states [B, T, D]."""
        cos, sin = rope_tables(rope_inverse_frequencies(self.cfg), embeds.shape[1])
        x = embeds.astype(self.dtype)
        return self.norm(stacked.scan(self.layers, x, cos, sin, lengths))
