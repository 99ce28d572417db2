"""The Python API (`Embedder.embed`) against the engine path the server takes, side by side in one run.

    python bench/python_api.py [--size tiny|mid] [--repeats 15]

Workloads: short queries of ~16 tokens, 1, 8 and 64 at a time. The engine path is an `Engine` with the server's
defaults for this backend (`EngineConfig.for_backend()`) given `EngineItem`s built from the texts, as
serving/runner.py builds them; the Python API is `Embedder.embed` on plain dicts. Each side has its own engine and
compiles, in one untimed call per workload, only the buckets that workload uses (neither is warmed up on the whole
plan). Rounds alternate the two sides (and which goes first) so that a slow moment of a shared machine hits both;
each figure is the median of its rounds, and the best round (less sensitive to other processes on a shared machine).
Prints a table, the least cosine between the two sides' vectors, and one ratio per workload (Python API throughput
over the engine path's: 1.00x or more is the target).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import checkpoint, compute_dtype, machine, text_of_tokens

WORKLOADS = {"1 query ~16 tok": 1, "8 queries ~16 tok": 8, "64 queries ~16 tok": 64}


def main() -> None:
    import jax

    from engine import Engine, EngineConfig, EngineItem
    from model import Embedder

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    dtype = compute_dtype()
    _, converted = checkpoint(args.size, dtype=dtype)
    embedder = Embedder(converted, dtype=dtype)
    engine = Engine(embedder, EngineConfig.for_backend())  # the engine path's own engine, as a server builds one

    rows = []
    for name, n in WORKLOADS.items():
        items = [{"text": text_of_tokens(embedder.prompter, 13, 1000 * n + i), "input_type": "query"}
                 for i in range(n)]
        tokens = sum(len(embedder.prompter.encode(i["text"], 0, "query")) for i in items)

        def by_engine():  # from the same texts: a caller of the engine builds its items, as the runner does
            return np.stack(engine.embed([EngineItem(text=i["text"], input_type="query") for i in items]))

        def by_api():
            return embedder.embed(items)

        cosine = float((by_engine() * by_api()).sum(-1).min())  # also compiles each side's buckets
        times: dict[str, list[float]] = {"engine": [], "api": []}
        for round_ in range(args.repeats):
            sides = [("engine", by_engine), ("api", by_api)]
            for side, fn in sides if round_ % 2 else sides[::-1]:  # neither side always runs second
                start = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - start)
        rows.append((name, n, tokens, statistics.median(times["engine"]), statistics.median(times["api"]),
                     min(times["engine"]), min(times["api"]), cosine))

    print(f"machine: {machine()}; checkpoint: random {args.size}; dtype: {dtype}; jax {jax.__version__} "
          f"({jax.default_backend()}); {args.repeats} alternating rounds per side, medians")
    print(f"engine path compiled {engine.stats.compilations} buckets, the Python API's engine "
          f"{embedder.engine.stats.compilations} (of {len(engine.bucket_keys())} in the plan)")
    print()
    print("| workload | inputs | tokens | engine path ms (median) | Python API ms (median) | engine path ms (best) "
          "| Python API ms (best) | least cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, tokens, e, a, e_best, a_best, cosine in rows:
        print(f"| {name} | {n} | {tokens} | {e * 1e3:.2f} | {a * 1e3:.2f} | {e_best * 1e3:.2f} | {a_best * 1e3:.2f} "
              f"| {cosine:.6f} |")
    print()
    for name, _, _, e, a, e_best, a_best, _ in rows:
        print(f"ratio Python API/engine path throughput, {name}: {e / a:.2f}x; best rounds {e_best / a_best:.2f}x")
    engine.close()
    embedder.close()


if __name__ == "__main__":
    main()
