"""Where one forward pass spends its time, op by op: a `jax.profiler` trace of the model benchmark's pass.

    python bench/profile_pass.py [--size mid] [--workload passages] [--top 15]

Runs one workload of bench/model_vs_reference.py (64 queries, 16 passages or 8 image tiles) as one precompiled
bucket, traces a pass after a warm-up, and prints the XLA ops that took longest (summed over the pass: an op that
runs inside a loop counts every time), each with its output shape and what the JAX program called it, read from the
compiled HLO. On a CPU, ops on different threads overlap: their times add up to more than the pass's wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from common import compute_dtype, machine, model_bench

WORKLOADS = {"queries": "64 queries ~16 tok", "passages": "16 passages ~512 tok", "tiles": "8 image tiles"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?(?:op_name=\"([^\"]*)\")?")


def hlo_index(compiled) -> dict[str, tuple[str, str]]:
    """op name -> (output shape, the JAX op it came from) for every instruction of a compiled executable."""
    out = {}
    for line in compiled.as_text().splitlines():
        m = INSTRUCTION.match(line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m[1]] = (m[2], op[1] if op else "")
    return out


def trace_events(directory: Path) -> list[dict]:
    path = next(directory.rglob("*.trace.json.gz"))
    return [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]


def main() -> None:
    import jax

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "full"])
    parser.add_argument("--workload", default="passages", choices=list(WORKLOADS))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    bench = model_bench(args.size)
    engine, dtype = bench.engine, compute_dtype()
    prepared = [bench.embedder.prepare(item) for item in bench.workloads[WORKLOADS[args.workload]]]
    key, batch = engine.collate_pass(any(p.num_tiles for p in prepared), prepared)
    np.asarray(engine.launch(key, batch))  # compile and warm
    start = time.perf_counter()
    np.asarray(engine.launch(key, batch))
    wall = time.perf_counter() - start

    index = hlo_index(engine._executable(key[:3]))
    if key[0] == "multimodal":
        index.update(hlo_index(engine._executable(("vision", key[3]))))
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as directory:
        jax.profiler.start_trace(directory)
        np.asarray(engine.launch(key, batch))
        jax.profiler.stop_trace()
        events = trace_events(Path(directory))

    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e["name"] in index:
            total[e["name"]] += e["dur"] / 1e3
            count[e["name"]] += 1
    print(f"machine: {machine()}; checkpoint: random {args.size}; {dtype}; jax {jax.__version__} "
          f"({jax.default_backend()}); workload: {WORKLOADS[args.workload]}, bucket {key}; one pass untraced: {wall:.3f} s")
    print()
    print("| op | ms | runs | output | from |")
    print("|---|---|---|---|---|")
    for name, ms in total.most_common(args.top):
        shape, source = index[name]
        print(f"| {name} | {ms:.1f} | {count[name]} | {shape} | {source} |")
    print()
    print(f"ops traced: {len(total)}, their time summed: {sum(total.values()) / 1e3:.3f} s")


if __name__ == "__main__":
    main()
