"""Time to ready of a `bentoml serve` replica, and compile time of one program against the decoder's depth.

    python bench/startup.py compile [--layers 2 16] [--rows 16 --length 512] [--run N] [--full] [--before /work/main]
    python bench/startup.py serve [--size tiny mid] [--phase cold warm] [--ready-early] [--before /work/main]

`compile`: one text program (rows × length tokens) of a network with abstract weights (nothing allocated, no
checkpoint), at the real widths, for each decoder depth in --layers: seconds to trace, lower and compile it, each in
a fresh process with no compilation cache; with --run N, also the median seconds of one run of it (zero weights,
which is where a scan over stacked layers could cost speed). `--full` adds the real configuration (27 + 16 layers) for GPU hosts.

`serve`: starts `bentoml serve` on a random checkpoint (tiny, or mid: the real widths with 2 + 2 layers) with an
empty compilation cache (cold), then again on the same cache (warm), and records: start -> first 200 on
/v1/health/live, live -> first 200 on /v1/health/ready, the CPU seconds the server's processes had used by then
(comparable on a shared machine, where wall time depends on the neighbours' load), and its own "ready:" log line.

--before ROOT runs every measurement also with the code checked out at ROOT (its own conversion, its own server), in
the same run, so the two columns share the machine's load. Results are appended to --log
(default bench/results/startup_<backend>.log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, scratch_dir
from server import cpu_seconds

try:
    import httpx
except ImportError:  # only `serve` needs it
    httpx = None

WORKER = r"""
import json, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from model.config import ModelConfig
from model.network import build_abstract, make_staged
from conversion.random_checkpoint import SIZES

size, layers, rows, length, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
runs = int(sys.argv[6])
llm = dict(SIZES[size]["llm_config"])
if layers:
    llm["num_hidden_layers"] = layers
cfg = ModelConfig.from_hf_config({"vision_config": SIZES[size]["vision_config"], "llm_config": llm,
                                  "img_context_token_id": 128258, "downsample_ratio": 0.5})
dt = jnp.dtype(dtype)
clock = lambda: (time.perf_counter(), time.process_time())  # wall, and CPU of this process (all its threads)
start = clock()
graphdef, state = nnx.split(build_abstract(cfg, dtype=dt, param_dtype=dt))
text = make_staged(graphdef).text
built = clock()
spec = jax.ShapeDtypeStruct
traced = text.trace(state, spec((rows, length), jnp.int32), spec((rows,), jnp.int32))
t_traced = clock()
lowered = traced.lower()
t_lowered = clock()
compiled = lowered.compile()
t_compiled = clock()
out = {"decoder_layers": cfg.text.num_hidden_layers, "width": cfg.text.hidden_size}
for i, unit in ((0, "s"), (1, "cpu_s")):
    out |= {f"trace_{unit}": t_traced[i] - built[i], f"lower_{unit}": t_lowered[i] - t_traced[i],
            f"compile_{unit}": t_compiled[i] - t_lowered[i], f"total_{unit}": t_compiled[i] - built[i]}
if runs:  # the program's speed too, on zero weights (dense products cost the same whatever the values)
    import numpy as np
    weights = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state)
    ids, lens = jnp.ones((rows, length), jnp.int32), jnp.full((rows,), length, jnp.int32)
    compiled(weights, ids, lens).block_until_ready()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        compiled(weights, ids, lens).block_until_ready()
        times.append(time.perf_counter() - t)
    out["pass_s"] = float(np.median(times))
print(json.dumps(out | {"hlo_kb": len(lowered.as_text()) // 1024, "backend": jax.default_backend()}))
"""


def log_line(path: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line)
    with open(path, "a") as f:
        f.write(line + "\n")


def code_roots(before: str | None) -> list[tuple[str, Path]]:
    return [("after", ROOT)] + ([("before", Path(before).resolve())] if before else [])


def compile_bench(args, log: Path) -> None:
    runs = [(args.size, n) for n in args.layers] + ([("full", 0)] if args.full else [])
    # Rounds interleave the code versions and depths, so a change in the machine's load hits every column alike.
    for _ in range(args.rounds):
        for size, layers in runs:
            for label, root in code_roots(args.before):
                env = {**os.environ, "PYTHONPATH": str(root)}
                out = subprocess.run([sys.executable, "-c", WORKER, size, str(layers), str(args.rows),
                                      str(args.length), args.dtype, str(args.run)], cwd=root, env=env, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                result = json.loads(out.stdout.strip().splitlines()[-1])
                log_line(log, {"bench": "compile_text_program", "code": label, "size": size, "rows": args.rows,
                               "length": args.length, "dtype": args.dtype,
                               **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}})


def convert_with(root: Path, src: Path, out: Path) -> None:
    """The checkpoint converted by the code at `root` (each version reads its own converted format)."""
    if (out / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "conversion", str(src), str(out), "--quiet"], cwd=root, check=True,
                   env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)


def serve_once(root: Path, model_dir: Path, cache: Path, log_file: Path, timeout: float, extra_env: dict) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMBED_MODEL": str(model_dir), "EMBED_COMPILATION_CACHE": str(cache),
           "EMBED_CACHE_DIR": str(cache.parent), "PYTHONPATH": str(root), **extra_env}
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([bentoml, "serve", "--port", str(port)], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    live = ready = None
    try:
        deadline = start + timeout
        while ready is None and time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log_file}:\n{log_file.read_text()[-3000:]}")
            for path in ("live", "ready"):
                if (live if path == "live" else ready) is not None:
                    continue
                try:
                    ok = httpx.get(f"{url}/v1/health/{path}", timeout=2).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok and path == "live":
                    live = time.perf_counter() - start
                elif ok and live is not None:
                    ready = time.perf_counter() - start
                    cpu = cpu_seconds(proc.pid)
            time.sleep(0.1)
        if ready is None:
            raise TimeoutError(f"not ready after {timeout:.0f} s; see {log_file}")
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    text = log_file.read_text()
    m = re.search(r"ready: .* loaded in ([\d.]+)s, (\d+) buckets compiled in ([\d.]+)s", text)
    return {"start_to_live_s": round(live, 1), "live_to_ready_s": round(ready - live, 1),
            "start_to_ready_s": round(ready, 1), "cpu_s_to_ready": round(cpu, 1),
            "log_loaded_s": float(m[1]) if m else None, "log_compiled": int(m[2]) if m else None,
            "log_warmup_s": float(m[3]) if m else None}


def serve_bench(args, log: Path) -> None:
    from conversion.random_checkpoint import write_random_checkpoint

    if httpx is None:
        raise SystemExit("serve needs httpx")
    work = scratch_dir("bench-startup-")
    for size in args.size:
        src = write_random_checkpoint(work / f"{size}-hf", size=size, seed=0, dtype="float32")
        for label, root in code_roots(args.before):
            extra_env = {"EMBED_READY_EARLY": "true"} if args.ready_early and label == "after" else {}
            label += "+ready_early" if extra_env else ""
            converted = work / f"{size}-{label}"
            convert_with(root, src, converted)
            cache = work / f"{size}-{label}-cache" / "xla"
            shutil.rmtree(cache.parent, ignore_errors=True)
            cache.parent.mkdir(parents=True)
            for phase in args.phase:
                result = serve_once(root, converted, cache, work / f"{size}-{label}-{phase}.log", args.timeout,
                                    extra_env)
                log_line(log, {"bench": "serve_ready", "code": label, "size": size, "phase": phase, **result})
            shutil.rmtree(converted, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    c.add_argument("--size", default="mid", choices=["tiny", "mid"], help="widths (mid: the real ones)")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--run", type=int, default=0, help="also time this many runs of the program (median)")
    c.add_argument("--rows", type=int, default=16)
    c.add_argument("--length", type=int, default=512)
    c.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    c.add_argument("--full", action="store_true", help="also the real configuration (27 + 16 layers)")
    s = sub.add_parser("serve")
    s.add_argument("--size", nargs="+", default=["tiny"], choices=["tiny", "mid"])
    s.add_argument("--phase", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    s.add_argument("--timeout", type=float, default=900)
    s.add_argument("--ready-early", action="store_true", help="this code with EMBED_READY_EARLY=true")
    for p in (c, s):
        p.add_argument("--before", help="also measure the code checked out at this root, in the same run")
        p.add_argument("--log", type=Path)
    args = parser.parse_args()
    import jax

    backend = jax.default_backend()
    if args.command == "compile" and args.dtype is None:
        args.dtype = "bfloat16" if backend == "gpu" else "float32"
    log = args.log or ROOT / "bench" / "results" / f"startup_{backend}.log"
    log_line(log, {"bench": "machine", "machine": machine(), "backend": backend, "jax": jax.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]})
    (compile_bench if args.command == "compile" else serve_bench)(args, log)


if __name__ == "__main__":
    main()
