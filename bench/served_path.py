"""What serving costs beside the model: the real server against the floor of a Python JSON server, side by side.

    python bench/served_path.py [--size tiny] [--seconds 10] [--workers 1 2 4] [--baseline DIR]

In one run, under the same load from `wrk` (a C load generator that costs the server's 2 cores little):
1. single-query requests (`input_type: query`, float JSON answer) at 32 connections: requests/s and the server's CPU
   milliseconds per request (all its processes, from /proc), against `bench/floor_server.py` (uvicorn + httptools +
   Starlette + pydantic + orjson answering a fixed 2048-d vector: what a request costs when the model is free);
2. the same with 1, 2 and 4 server workers (`EMBED_WORKERS`);
3. a 64-passage request answered as float JSON, and one page image per request;
4. liveness and readiness latency, on the main port and on the probes' own port, while 512 connections flood it;
5. the in-process engine on the same single queries (the model's own throughput here), for served/engine;
6. encoding one 2048-d float answer: orjson from numpy against `tolist()` + `json.dumps`.
`--baseline DIR` also serves another checkout (e.g. `git worktree add /tmp/base <commit>`) under the same load.
Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from common import ROOT, checkpoint, cpu_seconds, free_port, machine, picture, scratch_dir, start_server, text_of_tokens

MODEL = "nvidia/llama-nemotron-embed-vl-1b-v2"


def lua_for(body: dict) -> str:
    """A wrk script that POSTs `body` as JSON on every request."""
    text = json.dumps(body)
    fence = "=" * 8
    return (f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [{fence}[{text}]{fence}]\n")


def run_wrk(url: str, body: dict, connections: int, seconds: float, work: Path) -> dict:
    script = work / f"body-{abs(hash(json.dumps(body))) % 10**8}.lua"
    script.write_text(lua_for(body))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"{url}/v1/embeddings"], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1)),
              "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
              "errors": sum(int(x) for x in m.groups()) if (m := re.search(
                  r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)) else 0}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else float("nan")
        result[f"p{pct}_ms"] = float(m.group(1)) * scale if m else float("nan")
    return result


def measure(url: str, pid: int, body: dict, connections: int, seconds: float, work: Path) -> dict:
    """wrk against one server, with the server's CPU seconds (all its processes) over the same interval."""
    run_wrk(url, body, min(connections, 8), 1, work)  # warm connections and caches
    cpu0 = cpu_seconds(pid)
    result = run_wrk(url, body, connections, seconds, work)
    result["cpu_ms"] = (cpu_seconds(pid) - cpu0) / max(result["requests"], 1) * 1000
    return result


def probe_latencies(name: str, base: str, stop: threading.Event, out: list[tuple[str, float, int]]) -> None:
    """Live and ready on one base URL every 20 ms, a new connection each time (as a kubelet probes)."""
    while not stop.is_set():
        for path in ("/v1/health/live", "/v1/health/ready"):
            start = time.perf_counter()
            try:
                status = httpx.get(base + path, timeout=10).status_code
            except httpx.HTTPError:
                status = 0
            out.append((name, time.perf_counter() - start, status))
        time.sleep(0.02)


def overload(url: str, health_url: str | None, body: dict, seconds: float, work: Path) -> dict:
    probes: list[tuple[str, float, int]] = []
    stop = threading.Event()
    bases = {"main port": url, **({"health port": health_url} if health_url else {})}
    # One prober per port: a slow answer on one must not delay the probes of the other.
    threads = [threading.Thread(target=probe_latencies, args=(name, base, stop, probes)) for name, base in bases.items()]
    for thread in threads:
        thread.start()
    try:
        flood = run_wrk(url, body, 512, seconds, work)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    result: dict = {"flood": flood}
    for name in bases:
        lat = [t * 1000 for n, t, _ in probes if n == name]
        result[name] = {"probes": len(lat), "p50_ms": statistics.median(lat), "p99_ms": float(np.percentile(lat, 99)),
                        "max_ms": max(lat), "failures": sum(1 for n, _, s in probes if n == name and s != 200)}
    return result


def start_floor(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor_server.py"), "--port", str(port)],
                            stdout=open(work / "floor.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the floor server did not start")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def engine_queries_per_s(model_dir: Path, text: str, cache: str, seconds: float) -> float:
    """The in-process engine on the same single query, batches of 64 (what a saturated server batches here)."""
    from engine import Engine, EngineConfig, EngineItem, configure_compilation_cache
    from model import Embedder

    configure_compilation_cache(cache)
    engine = Engine(Embedder.from_pretrained(model_dir), EngineConfig.for_backend())
    items = [EngineItem(text=text, input_type="query")] * 64
    engine.embed(items)  # compiles the bucket it needs
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += len(engine.embed(items))
    return done / (time.perf_counter() - start)


def encoding_ms() -> tuple[float, float]:
    """ms per 2048-d float answer: orjson from numpy (the server) against tolist() + json.dumps."""
    import orjson

    vectors = np.random.default_rng(0).standard_normal((64, 2048)).astype(np.float32)
    body = lambda data: {"object": "list", "data": data, "model": MODEL}  # noqa: E731
    timings = []
    for encode in (lambda: orjson.dumps(body([{"embedding": v} for v in vectors]), option=orjson.OPT_SERIALIZE_NUMPY),
                   lambda: json.dumps(body([{"embedding": v.tolist()} for v in vectors])).encode()):
        encode()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            encode()
            n += 1
        timings.append((time.perf_counter() - start) / n / len(vectors) * 1000)
    return timings[0], timings[1]


def png_data_url(width: int, height: int, seed: int) -> str:
    buf = io.BytesIO()
    picture(width, height, seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid", "full"])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--baseline", type=Path, help="another checkout to serve under the same load")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")

    src, converted = checkpoint(args.size, dtype="float32")
    from model.config import ModelConfig
    from model.tokenization import Prompter

    prompter = Prompter.from_dir(converted, ModelConfig.from_dir(converted))
    query = {"model": MODEL, "input": ["What is the capital of France?"], "input_type": "query",
             "encoding_format": "float"}
    passages = {"model": MODEL, "input": [text_of_tokens(prompter, 200, i) for i in range(64)],
                "input_type": "passage", "encoding_format": "float"}
    page = {"model": MODEL, "input": [png_data_url(850, 1100, 7)], "input_type": "passage"}
    work = scratch_dir("bench-served-")
    cache = work / "xla"
    s = args.seconds
    rows: list[tuple[str, str, dict]] = []  # (server, workload, result)

    floor, floor_url = start_floor(work)
    try:
        rows.append(("floor", "1 query, c=32", measure(floor_url, floor.pid, query, 32, s, work)))
        servers = [("this", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        for name, root in servers:
            for workers in (args.workers if name == "this" else [1]):
                label = f"{name}, {workers} worker{'s' * (workers > 1)}"
                t = time.perf_counter()
                health = free_port()
                # Another checkout gets the Hugging Face layout and its own cache: it converts in its own format.
                model, server_cache = (converted, cache) if name == "this" else (src, work / name / "xla")
                server_cache.parent.mkdir(parents=True, exist_ok=True)
                proc, url = start_server(model, server_cache, root=root, log_name=f"server-{name}-{workers}.log",
                                         env={"EMBED_WORKERS": str(workers), "EMBED_HEALTH_PORT": str(health)})
                print(f"{label}: ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
                try:
                    rows.append((label, "1 query, c=32", measure(url, proc.pid, query, 32, s, work)))
                    print(label, rows[-1][2], file=sys.stderr)
                    if workers == 1:
                        rows.append((label, "64 passages ~200 tok, c=4", measure(url, proc.pid, passages, 4, s, work)))
                        rows.append((label, "1 page 850x1100, c=8", measure(url, proc.pid, page, 8, s, work)))
                        rows.append((label, "overload: 1 query, c=512",
                                     overload(url, f"http://127.0.0.1:{health}" if name == "this" else None,
                                              query, s, work)))
                finally:
                    stop(proc)
        # the same floor again, after: the machine's load may have moved during the run
        rows.append(("floor (again)", "1 query, c=32", measure(floor_url, floor.pid, query, 32, s, work)))
    finally:
        stop(floor)
    engine_qps = engine_queries_per_s(converted, query["input"][0], str(cache), s)
    orjson_ms, json_ms = encoding_ms()

    floor_rps = statistics.mean(r["rps"] for n, w, r in rows if n.startswith("floor"))
    floor_cpu = statistics.mean(r["cpu_ms"] for n, w, r in rows if n.startswith("floor"))
    print(f"machine: {machine()}; checkpoint: random {args.size}; wrk -t1, {s:g} s per run; "
          f"{time.strftime('%Y-%m-%d')}")
    print()
    print("| server | workload | requests/s | server CPU ms/request | p50 ms | p99 ms | non-2xx | socket errors | "
          "requests/s vs floor | CPU vs floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, workload, r in rows:
        if "flood" in r:
            continue
        vs = f"{r['rps'] / floor_rps:.2f}x | {r['cpu_ms'] / floor_cpu:.1f}x" if workload == "1 query, c=32" else " | "
        print(f"| {name} | {workload} | {r['rps']:.0f} | {r['cpu_ms']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['non2xx']} | {r['errors']} | {vs} |")
    print()
    for name, workload, r in rows:
        if "flood" in r:
            f = r["flood"]
            print(f"{name}, {workload}: {f['rps']:.0f} answers/s ({f['non2xx']} of {f['requests']} non-2xx: shed "
                  f"with 429), {f['errors']} socket errors; wrk latency p50 {f['p50_ms']:.1f} ms, p99 "
                  f"{f['p99_ms']:.1f} ms")
            for port in ("main port", "health port"):
                if port not in r:
                    continue
                p = r[port]
                print(f"  /v1/health/live and /ready on the {port} meanwhile: {p['probes']} probes, p50 "
                      f"{p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, max {p['max_ms']:.1f} ms, "
                      f"{p['failures']} not 200")
    one = next(r for n, w, r in rows if n == "this, 1 worker" and w == "1 query, c=32")
    print(f"in-process engine, the same query in batches of 64: {engine_qps:.0f} queries/s; served (1 worker, c=32) "
          f"/ engine: {one['rps'] / engine_qps:.2f}x")
    print(f"encoding one 2048-d float answer: orjson from numpy {orjson_ms:.3f} ms, tolist() + json.dumps "
          f"{json_ms:.3f} ms ({json_ms / orjson_ms:.0f}x)")


if __name__ == "__main__":
    main()
