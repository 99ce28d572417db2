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

from common import checkpoint, compute_dtype, machine, model_bench, scratch_dir

DEFAULT_FLAGS = {
    "gpu": ("", "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_command_buffer="),
    "cpu": ("", "--xla_cpu_experimental_ynn_fusion_type="),
}
WORKLOADS = ("64 queries ~16 tok", "16 passages ~512 tok", "8 image tiles")  # common.model_bench's


def child(size: str, repeats: int) -> dict[str, float]:
    import numpy as np

    bench = model_bench(size)
    out = {}
    for name, items in bench.workloads.items():
        prepared = [bench.embedder.prepare(item) for item in items]
        key, batch = bench.engine.collate_pass(any(p.num_tiles for p in prepared), prepared)
        np.asarray(bench.engine.launch(key, batch))  # compile and warm
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.asarray(bench.engine.launch(key, batch))
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

    flag_sets = list(dict.fromkeys(args.flags if args.flags else DEFAULT_FLAGS.get(jax.default_backend(), ("",))))
    if not os.environ.get("BENCH_CHECKPOINTS"):  # the children share one checkpoint, removed when this exits
        os.environ["BENCH_CHECKPOINTS"] = str(scratch_dir("bench-flags-"))
    checkpoint(args.size, dtype=compute_dtype())
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
