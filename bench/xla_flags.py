"""Does an XLA flag make the decoder's forward pass faster? Each flag set in its own process, side by side.

    python bench/xla_flags.py [--size full] [--flags "" "--xla_gpu_enable_triton_gemm=false" ...]

Times the text passes of the model benchmark alone (64 queries of ~16 tokens, 16 passages of ~512 tokens, as
one precompiled bucket each, inputs already on the host) under each `XLA_FLAGS` value; prints a table, then each
set's time over the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import checkpoint, machine, text_of_tokens

DEFAULT_FLAGS = ("", "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_command_buffer=")
WORKLOADS = {"64 queries ~16 tok": (64, 13, "query"), "16 passages ~512 tok": (16, 508, "passage")}


def child(size: str, repeats: int) -> dict[str, float]:
    import jax
    import numpy as np

    from engine import Engine, EngineConfig
    from model import Embedder

    gpu = jax.default_backend() == "gpu"
    _, converted = checkpoint(size, dtype="bfloat16" if gpu else "float32")
    embedder = Embedder(converted, dtype="bfloat16" if gpu else "float32")
    engine = Engine(embedder, EngineConfig.for_backend(max_length=768, max_batch_tokens=8192, max_tiles=8))
    out = {}
    for name, (n, tokens, input_type) in WORKLOADS.items():
        prepared = [embedder.prepare({"text": text_of_tokens(embedder.prompter, tokens, i), "input_type": input_type})
                    for i in range(n)]
        key, batch = engine.collate_pass(False, prepared)
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
    parser.add_argument("--flags", nargs="*", default=list(DEFAULT_FLAGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.repeats)))
        return
    checkpoint(args.size, dtype="bfloat16")  # built once here when $BENCH_CHECKPOINTS keeps it
    results = {}
    for flags in args.flags:
        env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])))
        done = subprocess.run([sys.executable, __file__, "--child", "--size", args.size, "--repeats",
                               str(args.repeats)], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        results[flags] = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        if results[flags] is None:
            print(f"flags {flags!r} failed: {done.stderr[-600:]}", file=sys.stderr)
    print(f"machine: {machine()}; checkpoint: random {args.size}")
    print()
    print("| XLA_FLAGS | " + " | ".join(f"{w} ms" for w in WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for flags, r in results.items():
        cells = [f"{r[w] * 1e3:.2f}" if r else "failed" for w in WORKLOADS]
        print(f"| {flags or '(default)'} | " + " | ".join(cells) + " |")
    print()
    base = results.get(args.flags[0])
    for flags, r in list(results.items())[1:]:
        if base and r:
            print(f"ratio default/({flags}) time: " + ", ".join(f"{w} {base[w] / r[w]:.2f}x" for w in WORKLOADS))


if __name__ == "__main__":
    main()
