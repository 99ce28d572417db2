"""Does an XLA flag make the forward pass faster? Each flag set in its own process, side by side.

    python bench/xla_flags.py [--size full] [--rounds 2] [--flags= --flags=--xla_gpu_enable_triton_gemm=false ...]

Times the device passes of the model benchmark alone (64 queries of ~16 tokens, 16 passages of ~512 tokens,
8 one-tile images, as one precompiled bucket each, inputs already on the host) under each `XLA_FLAGS` value;
prints a table, then each set's time over the default's. The default flag sets are the backend's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import checkpoint, machine, picture, scratch_dir, text_of_tokens

DEFAULT_FLAGS = {
    "gpu": ("", "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_command_buffer="),
    "cpu": ("", "--xla_cpu_experimental_ynn_fusion_type="),
}
WORKLOADS = {"64 queries ~16 tok": (64, 13, "query"), "16 passages ~512 tok": (16, 508, "passage"),
             "8 image tiles": (8, 0, "passage")}


def dtype_for(backend: str) -> str:
    return "bfloat16" if backend == "gpu" else "float32"


def child(size: str, repeats: int) -> dict[str, float]:
    import jax
    import numpy as np

    from engine import Engine, EngineConfig
    from model import Embedder

    dtype = dtype_for(jax.default_backend())
    _, converted = checkpoint(size, dtype=dtype)
    embedder = Embedder(converted, dtype=dtype)
    engine = Engine(embedder, EngineConfig.for_backend(max_length=768, max_batch_tokens=8192, max_tiles=8))
    tile = embedder.config.force_image_size
    out = {}
    for name, (n, tokens, input_type) in WORKLOADS.items():
        items = [{"text": text_of_tokens(embedder.prompter, tokens, i)} if tokens else
                 {"image": picture(tile, tile, 200 + i)} for i in range(n)]
        prepared = [embedder.prepare({**item, "input_type": input_type}) for item in items]
        key, batch = engine.collate_pass(not tokens, prepared)
        np.asarray(engine.launch(key, batch))  # compile and warm
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.asarray(engine.launch(key, batch))
            runs.append(time.perf_counter() - start)
        out[name] = statistics.median(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="full", choices=["tiny", "mid", "full"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the flag sets in turn this many times; each cell is the median over rounds")
    parser.add_argument("--flags", action="append",
                        help="an XLA_FLAGS value to compare, as --flags=VALUE (repeatable; default: the backend's list)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.repeats)))
        return
    import jax

    backend = jax.default_backend()
    flag_sets = list(dict.fromkeys(args.flags if args.flags else DEFAULT_FLAGS.get(backend, ("",))))
    if not os.environ.get("BENCH_CHECKPOINTS"):  # the children share one checkpoint, removed when this exits
        os.environ["BENCH_CHECKPOINTS"] = str(scratch_dir("bench-flags-"))
    checkpoint(args.size, dtype=dtype_for(backend))
    runs: dict[str, list[dict[str, float]]] = {flags: [] for flags in flag_sets}
    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every set alike
        for flags in flag_sets:
            env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])))
            done = subprocess.run([sys.executable, __file__, "--child", "--size", args.size, "--repeats",
                                   str(args.repeats)], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode == 0 and lines:
                runs[flags].append(json.loads(lines[-1]))
            else:
                print(f"flags {flags!r} failed: {done.stderr[-600:]}", file=sys.stderr)
    results = {flags: {w: statistics.median(r[w] for r in rs) for w in WORKLOADS} if rs else None
               for flags, rs in runs.items()}
    print(f"machine: {machine()}; checkpoint: random {args.size}; {args.rounds} round(s) of {args.repeats} repeats")
    print()
    print("| XLA_FLAGS | " + " | ".join(f"{w} ms" for w in WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for flags, r in results.items():
        cells = [f"{r[w] * 1e3:.2f}" if r else "failed" for w in WORKLOADS]
        print(f"| {flags or '(default)'} | " + " | ".join(cells) + " |")
    print()
    base = results[flag_sets[0]]
    for flags, r in list(results.items())[1:]:
        if base and r:
            print(f"ratio default/({flags}) time: " + ", ".join(f"{w} {base[w] / r[w]:.2f}x" for w in WORKLOADS))


if __name__ == "__main__":
    main()
