"""FP8 against bfloat16 forward passes, same device, same run, full-size random weights made on the device.

    python bench/fp8_speed.py [--size full] [--rows 128] [--length 512] [--tiles 32] [--repeats 5]
    python bench/fp8_speed.py --size tiny --rows 4 --length 64 --tiles 2 --repeats 1   # CPU smoke check

For a GPU of compute capability >= 8.9 (L4, L40S, H100, H200, Blackwell). No checkpoint is written: the
weights are random (matrices N(0, 1/fan_in), as conversion/random_checkpoint.py makes them) and generated on the
device, then cast to bfloat16 or quantised as `EMBED_DTYPE=fp8` does (model/fp8.py; served recipe: per-channel
weights, per-token activations, float32 product; plus the bfloat16-product variant, which only differs in the
product's output traffic). Workloads at the GPU engine's full batch: passages (rows x length tokens through the
decoder), image tiles (through the vision tower and projector), and short queries (where reading the weights
dominates).

Prints, per workload and dtype: the median time of a pass, tokens or tiles per second, the ratio FP8/bfloat16,
and the model FLOP utilisation (the matrix FLOPs of bench/flops.py over the time) against the datasheet dense peak
of the matching precision and against FP8 and bfloat16 matrix-product ceilings measured in the same run; and how
many of the compiled program's matrix products XLA actually runs as FP8 GEMMs (cuBLASLt's f8 custom call), since
a product XLA could not map would silently run in a wider type.
On a CPU the FP8 products are emulated: the timings there say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np

from common import ROOT, machine  # noqa: F401  (ROOT puts the project on sys.path)
from flops import best_seconds, decoder_flops_per_token, matmul_ceiling, vision_flops_per_tile

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.random_checkpoint import SIZES
from model import fp8
from model.config import ModelConfig, RopeScaling, TextConfig, VisionConfig
from model.network import build_abstract, make_staged

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s: (bfloat16, FP8). First match wins.
PEAKS = [("GH200", (989.4, 1978.9)), ("H200", (989.4, 1978.9)), ("H100 PCIe", (756.0, 1513.0)),
         ("H100 NVL", (835.0, 1671.0)), ("H100", (989.4, 1978.9)), ("L40S", (362.1, 733.0)), ("L4", (121.0, 242.5)),
         ("B200", (2250.0, 4500.0)), ("GB200", (2500.0, 5000.0))]


def config(size: str) -> ModelConfig:
    v, t = SIZES[size]["vision_config"], SIZES[size]["llm_config"]
    return ModelConfig(
        vision=VisionConfig(**v), downsample_ratio=0.5, img_context_token_id=t["vocab_size"] - 1,
        text=TextConfig(**t, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
        force_image_size=v["image_size"], use_thumbnail=True, max_dynamic_patch=6, query_prefix="query:",
        passage_prefix="passage:")


def random_float32(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The network with random float32 weights generated on the default device."""
    graphdef, abstract = nnx.split(build_abstract(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32))
    flat = []
    key = jax.random.key(0)
    for i, (path, variable) in enumerate(nnx.to_flat_state(abstract)):
        shape, name = variable.shape, path[-1]
        k = jax.random.fold_in(key, i)
        if name == "scale":  # norms
            value = 1 + 0.1 * jax.random.normal(k, shape, jnp.float32)
        elif name == "kernel":
            value = jax.random.normal(k, shape, jnp.float32) / np.sqrt(np.prod(shape[:-1]))
        elif name == "embedding":
            value = jax.random.normal(k, shape, jnp.float32) * (1.0 if "embed_tokens" in path else 0.02)
        else:  # biases
            value = 0.02 * jax.random.normal(k, shape, jnp.float32)
        flat.append((path, variable.replace(value)))
    return graphdef, nnx.from_flat_state(flat)


def to_bfloat16(state: nnx.State) -> nnx.State:
    return nnx.from_flat_state([(p, v.replace(v[...].astype(jnp.bfloat16))) for p, v in nnx.to_flat_state(state)])


def fp8_ceiling(n: int) -> float:
    """FLOP/s of one n x n by n x n e4m3 product (float32 accumulation and output), best of 5."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32).astype(fp8.E4M3)
    f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    return 2 * n**3 / best_seconds(f, a, a)


def gemm_counts(compiled) -> tuple[int, int]:
    """(FP8 GEMMs, all GEMMs and dots) in a compiled program's text."""
    text = compiled.as_text()
    f8 = len(re.findall(r'custom_call_target="__cublas\$lt\$matmul\$f8"', text))
    every = len(re.findall(r'custom_call_target="__cublas\$(?:lt\$)?(?:matmul|gemm)[^"]*"', text))
    return f8, every + len(re.findall(r"\bdot\(", text))


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up after compilation
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--rows", type=int, default=128, help="passages per pass")
    parser.add_argument("--length", type=int, default=512, help="tokens per passage")
    parser.add_argument("--query-rows", type=int, default=128)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=32, help="image tiles per vision pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ceiling-size", type=int, default=8192)
    args = parser.parse_args()

    device = jax.devices()[0]
    mode = fp8.check_device(device)
    cfg = config(args.size)
    print(f"# FP8 vs bfloat16 forward passes, random {args.size} weights")
    print(f"machine: {machine()}; JAX {jax.__version__} on {device.device_kind} ({mode} FP8)\n")

    graphdef, f32_state = random_float32(cfg)
    models = {"bfloat16": (graphdef, to_bfloat16(f32_state))}
    for name, recipe in {"fp8": fp8.SERVING, "fp8 bf16-product": fp8.Recipe(product_dtype="bfloat16")}.items():
        models[name] = fp8.quantize(graphdef, f32_state, recipe, param_dtype=jnp.bfloat16)
    del f32_state

    rng = np.random.default_rng(0)
    vocab = cfg.text.vocab_size - 2
    passages = (jnp.asarray(rng.integers(0, vocab, (args.rows, args.length)), jnp.int32),
                jnp.full((args.rows,), args.length, jnp.int32))
    queries = (jnp.asarray(rng.integers(0, vocab, (args.query_rows, args.query_length)), jnp.int32),
               jnp.full((args.query_rows,), args.query_length, jnp.int32))
    side = cfg.force_image_size
    pixels = jnp.asarray(rng.integers(0, 256, (args.tiles, side, side, cfg.vision.num_channels)), jnp.uint8)
    workloads = {
        f"passages {args.rows}x{args.length} tok": ("text", passages, args.rows * args.length,
                                                   decoder_flops_per_token(cfg, args.length) * args.rows * args.length),
        f"queries {args.query_rows}x{args.query_length} tok": (
            "text", queries, args.query_rows * args.query_length,
            decoder_flops_per_token(cfg, args.query_length) * args.query_rows * args.query_length),
        f"image tiles x{args.tiles}": ("vision", (pixels,), args.tiles, vision_flops_per_tile(cfg) * args.tiles),
    }

    bf16_ceiling = matmul_ceiling(jnp.bfloat16, args.ceiling_size)
    f8_ceiling = fp8_ceiling(args.ceiling_size)
    peak = next((p for kind, p in PEAKS if kind in device.device_kind), None) if device.platform == "gpu" else None
    print(f"measured {args.ceiling_size}^3 product ceilings: bfloat16 {bf16_ceiling / 1e12:.1f} TFLOP/s, "
          f"e4m3 {f8_ceiling / 1e12:.1f} TFLOP/s" + (f"; datasheet dense peaks {peak[0]} / {peak[1]} TFLOP/s"
                                                    if peak else "; no datasheet peak for this device"))
    print()
    print("| workload | dtype | pass (ms) | per s | FP8/bf16 | TFLOP/s | MFU vs own peak | vs FP8 peak "
          "| vs measured ceiling (own) | FP8 GEMMs / products | cosine vs bf16 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for workload, (kind, inputs, units, flops) in workloads.items():
        times, outputs = {}, {}
        for name, (g, state) in models.items():
            staged = make_staged(g)
            call_args = (state, *inputs)
            if kind == "text":
                compiled = staged.text.lower(*call_args).compile()
            else:  # the capacity is static: the compiled program takes (state, pixels)
                compiled = staged.vision.lower(*call_args, capacity=args.tiles).compile()
            f8_gemms, products = gemm_counts(compiled)
            times[name] = timed(compiled, call_args, args.repeats)
            outputs[name] = np.asarray(compiled(*call_args), np.float32)
            rate = flops / times[name]
            own = (peak[1] if name.startswith("fp8") else peak[0]) * 1e12 if peak else None
            ceiling = f8_ceiling if name.startswith("fp8") else bf16_ceiling
            a, b = outputs[name], outputs["bfloat16"]
            cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            mfu = f"{100 * rate / own:.1f}%" if own else "-"
            vs_fp8 = f"{100 * rate / (peak[1] * 1e12):.1f}%" if peak else "-"
            print(f"| {workload} | {name} | {times[name] * 1e3:.2f} | {units / times[name]:,.0f} | "
                  f"{times['bfloat16'] / times[name]:.2f}x | {rate / 1e12:.1f} | {mfu} | {vs_fp8} | "
                  f"{100 * rate / ceiling:.1f}% | {f8_gemms} / {products} | {float(np.min(cos)):.5f} |")
    print("\nratio = bfloat16 time / FP8 time (above 1: FP8 faster). FLOPs count every matrix product, the ones "
          "FP8 leaves in bfloat16 too (attention scores and sums, projector, patch embedding), so the FP8 rows' MFU "
          "against the FP8 peak is a lower bound.")


if __name__ == "__main__":
    main()
