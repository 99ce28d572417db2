"""BentoML's distributed-Services shape, built, against the served path, side by side under the same load.

    python bench/distributed_services.py [--seconds 10] [--front-workers 1 2]

The shape BentoML's docs give for pipelining CPU and GPU work: an HTTP front service (`Front`: parse, tokenise,
encode the answer with orjson) calls a model service (`Model`, one worker: BentoML's adaptive batching through its
public `batchable` API, the same engine and buckets as the server) with token ids, through `bentoml.depends`. It is
a prototype for measuring the path, not a second server: single text inputs, no NIM validation or errors.
`bentoml serve bench.distributed_services:Front` starts both. In one run, `wrk` (one thread, 32 connections) sends
the same single query to it (1 and 2 front workers) and to the real server (1 worker); the table gives requests/s
and the CPU of all their processes per request, with the floor of a bare Python JSON server.
Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# As the real server has them: no BentoML per-request metrics, access lines or tracing spans (each costs CPU).
LEAN = {"metrics": {"enabled": False}, "logging": {"access": {"enabled": False}}, "tracing": {"excluded_urls": [".*"]}}


@bentoml.service(name="distributed_model", workers=1, traffic={"timeout": 60}, **LEAN)
class Model:
    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT))
        from engine import Engine, EngineConfig, configure_compilation_cache
        from model import Embedder
        from serving.settings import get_settings

        settings = get_settings()
        configure_compilation_cache(settings.compilation_cache)
        embedder = Embedder.from_pretrained(settings.model, dtype=settings.dtype)
        self.engine = Engine(embedder, EngineConfig.for_backend(
            max_length=settings.longest_input(), max_batch_tokens=settings.max_batch_tokens,
            max_rows=settings.max_rows, max_tiles=settings.max_tiles_per_pass, host_threads=settings.decode_threads))
        self.engine.warmup()

    @bentoml.api(batchable=True, max_batch_size=256, max_latency_ms=1000)
    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        from engine import EngineItem

        return np.stack(self.engine.embed([EngineItem(token_ids=ids) for ids in token_ids]))


@bentoml.service(name="distributed_front", workers=1, traffic={"timeout": 60}, **LEAN)  # main() sets the workers
class Front:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT))
        from model.config import ModelConfig
        from model.tokenization import Prompter
        from serving.settings import get_settings

        directory = get_settings().model
        self.prompter = Prompter.from_dir(directory, ModelConfig.from_dir(directory))

    @bentoml.api(route="/v1/embeddings")
    async def embeddings(self, input: list[str], model: str = "", input_type: str = "query",
                         encoding_format: str = "float"):
        import orjson
        from starlette.responses import Response

        ids = [self.prompter.encode(text, 0, input_type).tolist() for text in input]
        vectors = await self.model.to_async.embed(ids)
        tokens = sum(len(i) for i in ids)
        body = {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": k, "embedding": v} for k, v in enumerate(vectors)]}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def main() -> None:
    import argparse
    import shutil
    import time

    sys.path.insert(0, str(ROOT / "bench"))
    from common import checkpoint, machine, scratch_dir, start_server
    from served_path import MODEL, measure, start_floor, stop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--front-workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    _, converted = checkpoint("tiny", dtype="float32")
    query = {"model": MODEL, "input": ["What is the capital of France?"], "input_type": "query",
             "encoding_format": "float"}
    work = scratch_dir("bench-distributed-")
    cache = work / "xla"
    rows = []
    floor, floor_url = start_floor(work)
    try:
        rows.append(("floor", measure(floor_url, floor.pid, query, 32, args.seconds, work)))
        proc, url = start_server(converted, cache, log_name="server.log")
        try:
            rows.append(("the served path, 1 worker", measure(url, proc.pid, query, 32, args.seconds, work)))
        finally:
            stop(proc)
        for workers in args.front_workers:
            # Ready once a query is answered: the model service has loaded and warmed up.
            proc, url = start_server(converted, cache, log_name=f"distributed-{workers}.log",
                                     target="bench.distributed_services:Front", answers=query,
                                     env={"EMBED_DTYPE": "float32",
                                          "BENTOML_CONFIG_OPTIONS": f"services.distributed_front.workers={workers}"})
            try:
                label = f"distributed Services, {workers} front worker{'s' * (workers > 1)} + 1 model worker"
                rows.append((label, measure(url, proc.pid, query, 32, args.seconds, work)))
            finally:
                stop(proc)
        rows.append(("floor (again)", measure(floor_url, floor.pid, query, 32, args.seconds, work)))
    finally:
        stop(floor)
    floor_rps = np.mean([r["rps"] for name, r in rows if name.startswith("floor")])
    print(f"machine: {machine()}; checkpoint: random tiny; 1 query per request, wrk -t1 -c32, {args.seconds:g} s "
          f"per run; {time.strftime('%Y-%m-%d')}\n")
    print("| server | requests/s | server CPU ms/request | p50 ms | p99 ms | non-2xx | requests/s vs floor |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['rps']:.0f} | {r['cpu_ms']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['non2xx']} | {r['rps'] / floor_rps:.2f}x |")


if __name__ == "__main__":
    main()
