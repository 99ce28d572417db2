"""Flax against the PyTorch reference, in one run, on the same random checkpoint.

    python bench/model_vs_reference.py [--size mid] [--repeats 3]

Workloads (issue #4): 64 queries of ~16 tokens, 16 passages of ~512 tokens, 8 image tiles (8 one-tile
images). Both sides run end to end from the same inputs (preprocessing included): Flax through the serving
engine (buckets compiled ahead, as served), PyTorch through the reference's batched `embed`, after one warm-up
call each. float32 on CPU; on a GPU bfloat16 for both (PyTorch with SDPA).
Prints a table, then the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import checkpoint, machine, picture, text_of_tokens


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation for JAX, allocator and kernels for PyTorch
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    import jax
    import torch

    from engine import Engine, EngineConfig, EngineItem
    from model import Embedder
    from tests.reference import ReferenceModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    src, converted = checkpoint(args.size, dtype="bfloat16" if on_gpu else "float32")
    embedder = Embedder(converted, dtype=dtype)
    # One pass per workload on every backend (16 × 512 = 8192 tokens), and few buckets to compile.
    engine = Engine(embedder, EngineConfig.for_backend(max_length=768, max_batch_tokens=8192, max_tiles=8))
    engine.warmup()
    tile = embedder.config.force_image_size
    workloads = {
        "64 queries ~16 tok": [{"text": text_of_tokens(embedder.prompter, 13, i), "input_type": "query"} for i in range(64)],
        "16 passages ~512 tok": [{"text": text_of_tokens(embedder.prompter, 508, 100 + i), "input_type": "passage"}
                                 for i in range(16)],
        "8 image tiles": [{"image": picture(tile, tile, 200 + i), "input_type": "passage"} for i in range(8)],
    }
    reference = ReferenceModel.from_pretrained(src, dtype=torch.bfloat16 if on_gpu else torch.float32)
    if on_gpu:
        reference = reference.to("cuda")

    rows = []
    for name, items in workloads.items():
        units = len(items)
        tokens = sum(embedder.prepare(item).num_tokens for item in items)
        engine_items = [EngineItem(text=i.get("text"), image=i.get("image"), input_type=i["input_type"]) for i in items]
        flax_s = timed(lambda: engine.embed(engine_items), args.repeats)
        with torch.inference_mode():
            torch_s = timed(lambda: reference.embed(items), args.repeats)
        rows.append((name, units, tokens, flax_s, torch_s))

    print(f"machine: {machine()}; checkpoint: random {args.size}; dtype: {dtype}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print()
    print("| workload | inputs | tokens | Flax s | PyTorch s | Flax inputs/s | PyTorch inputs/s |")
    print("|---|---|---|---|---|---|---|")
    for name, units, tokens, f, t in rows:
        print(f"| {name} | {units} | {tokens} | {f:.3f} | {t:.3f} | {units / f:.1f} | {units / t:.1f} |")
    print()
    for name, _, _, f, t in rows:
        print(f"ratio Flax/PyTorch throughput, {name}: {t / f:.2f}x")


if __name__ == "__main__":
    main()
