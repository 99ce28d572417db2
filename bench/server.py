"""The served mixed workload at several concurrencies, against the in-process engine on the same inputs.

    python bench/server.py [--size tiny] [--requests 256] [--concurrency 1 8 32 64] [--url http://host:3000]

Starts `bentoml serve` on a random checkpoint (unless --url), sends a deterministic mix of short queries, ~512-token
passages, page-like images and image+text (one input per request, as a retriever's query path and an ingestion
pipeline's small batches do), and reads the server's own Prometheus series for what happened inside: forward passes,
padding efficiency (real tokens / computed tokens), batch sizes, compilations after ready. Then it embeds the same
inputs with the engine in this process (the same bucket plan) and prints served throughput over engine throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from common import checkpoint, cpu_seconds, machine, picture, scratch_dir, start_server, text_of_tokens

MODEL = "nvidia/llama-nemotron-embed-vl-1b-v2"


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(prompter, n: int) -> list[dict]:
    """n request bodies: queries, passages, images and image+text, interleaved, deterministic."""
    bodies = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            bodies.append({"input": [text_of_tokens(prompter, 14, i)], "input_type": "query"})
        elif kind == 1:
            bodies.append({"input": [text_of_tokens(prompter, 500, i)], "input_type": "passage"})
        elif kind == 2:
            bodies.append({"input": [png_data_url(picture(850, 1100, i))], "input_type": "passage"})
        else:
            url = png_data_url(picture(640, 480, i))
            bodies.append({"input": [text_of_tokens(prompter, 40, i) + "\n" + url], "input_type": "passage"})
    for b in bodies:
        b["model"] = MODEL
    return bodies


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/v1/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def run_level(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(body):
            nonlocal errors
            async with sem:
                start = time.perf_counter()
                r = await client.post(f"{url}/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, latencies, errors


def engine_throughput(model_dir: Path, bodies: list[dict], cache: str, batch: int,
                      repeats: int = 3) -> tuple[float, float]:
    """(inputs/s, CPU cores used meanwhile) of the engine in this process on the same inputs: the median run."""
    from engine import Engine, EngineConfig, EngineItem, configure_compilation_cache
    from model import Embedder
    from serving.inputs import PILLOW_FORMATS
    from serving.settings import Settings

    configure_compilation_cache(cache)
    settings = Settings.from_env()
    embedder = Embedder.from_pretrained(model_dir)
    engine = Engine(embedder, EngineConfig.for_backend(max_length=settings.longest_input(),
                                                       image_formats=PILLOW_FORMATS))
    engine.warmup()
    items = []
    for b in bodies:
        text = b["input"][0]
        m = re.search(r"data:image/png;base64,(\S+)", text)
        image = base64.b64decode(m.group(1)) if m else None
        rest = text[: m.start()].strip() if m else text
        items.append(EngineItem(text=rest or None, image=image, input_type=b["input_type"]))
    runs = []
    for _ in range(repeats):  # the median of a few runs: one pass over the inputs takes only seconds here
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(items), batch):
            results = engine.embed(items[i: i + batch])
            assert all(isinstance(r, np.ndarray) for r in results), results
        wall = time.perf_counter() - start
        runs.append((len(items) / wall, (time.process_time() - cpu) / wall))
    return sorted(runs)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid", "full"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--url", help="an already running server of the same checkpoint (skips starting one)")
    args = parser.parse_args()

    _, converted = checkpoint(args.size, dtype="float32")
    from model.tokenization import Prompter
    from model.config import ModelConfig

    prompter = Prompter.from_dir(converted, ModelConfig.from_dir(converted))
    bodies = workload(prompter, args.requests)
    work = scratch_dir("bench-server-")
    cache = work / "xla"
    proc = None
    url = args.url
    if url is None:
        t = time.perf_counter()
        proc, url = start_server(converted, cache)
        print(f"server ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows, breakdown = [], []
    try:
        asyncio.run(run_level(url, bodies[:8], 4))  # warm connections and the batcher's cost model
        for c in args.concurrency:
            before = scrape(url)
            cpu0, client0 = cpu_seconds(proc.pid if proc else None), time.process_time()
            wall, lat, errors = asyncio.run(run_level(url, bodies, c))
            cpu1, client1 = cpu_seconds(proc.pid if proc else None), time.process_time()
            after = scrape(url)
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            mean = lambda name: d.get(f"{name}_sum", 0) / d[f"{name}_count"] if d.get(f"{name}_count") else 0  # noqa
            breakdown.append(dict(
                c=c, server_cores=(cpu1 - cpu0) / wall, client_cores=(client1 - client0) / wall,
                request_ms=mean("nim_request_duration_seconds") * 1000, queue_ms=mean("nim_queue_duration_seconds") * 1000,
                batch_ms=mean("nim_inference_duration_seconds") * 1000,
                batch_busy=d.get("nim_inference_duration_seconds_sum", 0) / wall))
            real, computed = d.get("nim_forward_real_tokens_total", 0), d.get("nim_forward_computed_tokens_total", 0)
            passes = d.get("nim_forward_pass_inputs_count", 0)
            batches = d.get("nim_batch_size_count", 0)
            rows.append(dict(
                c=c, rps=len(bodies) / wall, p50=statistics.median(lat) * 1000,
                p99=float(np.percentile(lat, 99)) * 1000, errors=errors,
                efficiency=real / computed if computed else float("nan"),
                batch=d.get("nim_batch_size_sum", 0) / batches if batches else 0,
                per_pass=d.get("nim_forward_pass_inputs_sum", 0) / passes if passes else 0,
                compiles=after.get("nim_compilations_after_ready_total", 0)))
    finally:
        if proc is not None:
            os.killpg(proc.pid, 15)
            proc.wait(60)
    engine_rps, engine_cores = engine_throughput(converted, bodies, str(cache), batch=128)

    print(f"machine: {machine()}; checkpoint: random {args.size}; {args.requests} requests of one input each "
          f"(queries ~16 tok, passages ~512 tok, 850×1100 images, 640×480 image+text)")
    print()
    print("| concurrency | inputs/s | p50 ms | p99 ms | errors | padding efficiency | inputs per batch | "
          "inputs per forward pass | compilations after ready |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['c']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['errors']} | "
              f"{r['efficiency']:.2f} | {r['batch']:.1f} | {r['per_pass']:.1f} | {r['compiles']:.0f} |")
    print(f"| in-process engine (batches of 128, median of 3 runs, {engine_cores:.2f} CPU cores) | {engine_rps:.1f} "
          "| | | | | | | |")
    print()
    print("Where the time goes (server-side means from its metrics; CPU from /proc; %d cores):" % (os.cpu_count() or 0))
    print()
    # CPU per input: what serving costs beside the engine's own work. The engine-bound ceiling is what the server
    # could reach with no serving overhead at all on the cores the load generator leaves it.
    cores = os.cpu_count() or 1
    engine_ms = engine_cores / engine_rps * 1000
    print("| concurrency | server CPU cores | load generator CPU cores | request ms | queue wait ms | batch ms | "
          "batch thread busy | server CPU ms per input | engine-bound ceiling inputs/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, r in zip(breakdown, rows):
        b["ceiling"] = (cores - b["client_cores"]) / engine_ms * 1000
        print(f"| {b['c']} | {b['server_cores']:.2f} | {b['client_cores']:.2f} | {b['request_ms']:.0f} | "
              f"{b['queue_ms']:.0f} | {b['batch_ms']:.0f} | {b['batch_busy']:.0%} | "
              f"{b['server_cores'] / r['rps'] * 1000:.1f} | {b['ceiling']:.1f} |")
    print(f"| in-process engine | {engine_cores:.2f} | | | | | | {engine_ms:.1f} | |")
    print()
    for b in breakdown:
        print(f"ratio engine-bound ceiling/engine throughput at concurrency {b['c']}: {b['ceiling'] / engine_rps:.2f}x")
    for r in rows:
        print(f"ratio served/engine throughput at concurrency {r['c']}: {r['rps'] / engine_rps:.2f}x")


if __name__ == "__main__":
    main()
