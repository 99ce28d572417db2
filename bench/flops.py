"""Floating-point operations of the model's matrix products, counted from its configuration.

2 per multiply-add of every weight a token or patch goes through, plus attention's scores and weighted sum
(4·T·H·N per token and layer). Norms, activations and the softmax are left out: they are not matrix work.
"""

from __future__ import annotations


def decoder_flops_per_token(cfg, length: int) -> float:
    t = cfg.text
    attn_proj = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    attention = 4 * length * t.head_dim * t.num_attention_heads
    return t.num_hidden_layers * (2 * (attn_proj + mlp) + attention)


def vision_flops_per_tile(cfg) -> float:
    v, p = cfg.vision, cfg.vision.num_patches
    per_token = v.num_hidden_layers * (2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                       + 4 * p * v.hidden_size)
    patch = 2 * v.num_channels * v.patch_size**2 * v.hidden_size
    projector = 2 * (cfg.projector_in_features * cfg.text.hidden_size + cfg.text.hidden_size**2) / cfg.shuffle_factor**2
    return p * (per_token + patch + projector)


def pass_flops(cfg, key: tuple) -> float:
    """FLOPs of one engine pass as computed, padding included: key ("text", rows, length) or
    ("multimodal", rows, length, tiles)."""
    rows, length = key[1], key[2]
    flops = decoder_flops_per_token(cfg, length) * rows * length
    if key[0] == "multimodal":
        flops += vision_flops_per_tile(cfg) * key[3]
    return flops
