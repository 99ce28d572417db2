"""Throughput and MFU at full batch: 512-token passages and image tiles, against a matmul ceiling measured here.

    python bench/gpu.py [--size full] [--seconds 20]

Meant for a GPU (bfloat16); runs on a CPU too (float32, use --size tiny or mid), where the MFU is against the
CPU's own matmul ceiling. FLOPs count the matrix products of the model (2·params per token, plus attention's
4·T·H·N per token and layer); the ceiling is the best of a few large square products in the compute dtype, by
JAX and, where PyTorch sees the same GPU, by PyTorch (cuBLAS): MFU is against the higher of the two.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import checkpoint, machine, picture, text_of_tokens
from flops import decoder_flops_per_token, matmul_ceiling, torch_matmul_ceiling, vision_flops_per_tile


def run_for(fn, seconds: float) -> tuple[int, float]:
    fn()  # compile and warm
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - start


def main() -> None:
    from engine import Engine, EngineConfig, EngineItem
    from model import Embedder

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="full", choices=["tiny", "mid", "full"])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--matmul", type=int, default=8192)
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    _, converted = checkpoint(args.size, dtype="bfloat16")
    embedder = Embedder(converted, dtype=dtype)
    engine = Engine(embedder, EngineConfig.for_backend(max_length=args.max_length))
    cfg = embedder.config
    plan = engine.plan

    passage_rows = plan.row_cap(512)
    passages = [embedder.prepare({"text": text_of_tokens(embedder.prompter, 500, i), "input_type": "passage"})
                for i in range(passage_rows)]
    length = plan.length_for(max(p.num_tokens for p in passages))
    text_batch = embedder.collate(passages, length=length, rows=passage_rows, tiles=0)
    text_fn = engine._executable(("text", passage_rows, length))
    calls, secs = run_for(lambda: text_fn(embedder.state, text_batch.input_ids, text_batch.lengths).block_until_ready(),
                          args.seconds)
    real_tokens = sum(p.num_tokens for p in passages) * calls
    passage_flops = decoder_flops_per_token(cfg, length) * passage_rows * length * calls

    tiles = plan.max_tiles
    side = cfg.force_image_size
    pixels = np.stack([np.asarray(picture(side, side, i).convert("RGB")) for i in range(tiles)])
    vision_fn = engine._executable(("vision", tiles))
    vcalls, vsecs = run_for(lambda: vision_fn(embedder.state, pixels).block_until_ready(), args.seconds)
    tile_flops = vision_flops_per_tile(cfg) * tiles * vcalls

    jax_ceiling = matmul_ceiling(jnp.bfloat16 if gpu else jnp.float32, args.matmul)
    torch_ceiling = torch_matmul_ceiling(args.matmul, gpu=True) if gpu else None
    ceiling = max(jax_ceiling, torch_ceiling or 0.0)
    print(f"machine: {machine()}; checkpoint: random {args.size}; dtype: {dtype}; jax {jax.__version__}")
    print()
    print("| workload | batch | throughput | achieved TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    print(f"| passages ~512 tok | {passage_rows} × {length} | {real_tokens / secs:,.0f} tokens/s | "
          f"{passage_flops / secs / 1e12:.1f} | {passage_flops / secs / ceiling:.0%} |")
    print(f"| image tiles (vision tower + projector) | {tiles} tiles | {tiles * vcalls / vsecs:,.1f} tiles/s | "
          f"{tile_flops / vsecs / 1e12:.1f} | {tile_flops / vsecs / ceiling:.0%} |")
    name = jnp.dtype(jnp.bfloat16 if gpu else jnp.float32).name
    print(f"| matmul ceiling, JAX ({args.matmul}², {name}) | | | {jax_ceiling / 1e12:.1f} | {jax_ceiling / ceiling:.0%} |")
    if torch_ceiling:
        print(f"| matmul ceiling, PyTorch ({args.matmul}², {name}) | | | {torch_ceiling / 1e12:.1f} | "
              f"{torch_ceiling / ceiling:.0%} |")
    print()
    print(f"MFU passages: {passage_flops / secs / ceiling:.2f}")
    print(f"MFU tiles: {tile_flops / vsecs / ceiling:.2f}")
    del EngineItem


if __name__ == "__main__":
    main()
