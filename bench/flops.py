"""Floating-point operations of the model's matrix products, counted from its configuration.

2 per multiply-add of every weight a token or patch goes through, plus attention's scores and weighted sum
(4·T·H·N per token and layer). Norms, activations and the softmax are left out: they are not matrix work.
"""

from __future__ import annotations

import time


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


def matmul_ceiling(dtype, n: int) -> float:
    """FLOP/s of one n×n by n×n product through JAX on its default device (best of 5)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    return 2 * n**3 / best_seconds(jax.jit(lambda x, y: x @ y), a, a)


def best_seconds(f, *args, rounds: int = 5) -> float:
    """The fastest of `rounds` timed calls of a jitted `f` (after one call that compiles it)."""
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def torch_matmul_ceiling(n: int, gpu: bool) -> float | None:
    """The same product through PyTorch (cuBLAS on a GPU in bfloat16, its CPU BLAS in float32, with the threads
    it runs the reference with), or None without PyTorch or without the GPU asked for."""
    try:
        import torch
    except ImportError:
        return None
    if gpu and not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda" if gpu else "cpu", dtype=torch.bfloat16 if gpu else torch.float32)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            a @ a
        sync()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            sync()
            best = min(best, time.perf_counter() - start)
    del a
    if gpu:
        torch.cuda.empty_cache()
    return 2 * n**3 / best
