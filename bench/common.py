"""Shared helpers for the benchmarks: random checkpoints, workloads and the machine's name."""

from __future__ import annotations

import atexit
import dataclasses
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("the of index table chart page scanned vector retrieval query passage model image text figure revenue "
         "quarter growth report summary method result dataset benchmark latency throughput memory").split()


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().replace("\n", ", ")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{cpu} ({os.cpu_count()} cores)" + (f", GPU: {gpu}" if gpu else "")


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the benchmark exits (a mid-size checkpoint is 3 GB; left behind, a few
    runs fill the disk)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def checkpoint(size: str, dtype: str = "float32", seed: int = 0) -> tuple[Path, Path]:
    """(Hugging Face layout dir, converted dir) of a random checkpoint, in a temporary directory removed at exit, or
    kept under $BENCH_CHECKPOINTS and reused there (several benchmarks in one run build a full-size one once)."""
    from conversion.convert import convert
    from conversion.random_checkpoint import write_random_checkpoint

    keep = os.environ.get("BENCH_CHECKPOINTS")
    root = Path(keep) / f"{size}-{dtype}-{seed}" if keep else scratch_dir(f"bench-{size}-")
    done = root / "complete"
    if done.exists():
        return root / "hf", root / "converted"
    src = write_random_checkpoint(root / "hf", size=size, seed=seed, dtype=dtype)
    convert(src, root / "converted", progress=False)
    done.touch()
    return src, root / "converted"


def compute_dtype() -> str:
    """What the model computes in on this machine's JAX backend: bfloat16 on a GPU, float32 on a CPU."""
    import jax

    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


@dataclasses.dataclass
class ModelBench:
    src: Path  # the Hugging Face layout, for the PyTorch reference
    embedder: Any
    engine: Any  # one pass per workload: 16 × 512 = 8192 tokens, 8 tiles
    workloads: dict[str, list[dict]]  # the three model workloads, by name, as `embed` items


def model_bench(size: str) -> ModelBench:
    """The setup shared by the model benchmarks (model_vs_reference, xla_flags, profile_pass): the random checkpoint
    in the backend's compute dtype, its engine, and the workloads: 64 queries of ~16 tokens, 16 passages of ~512
    tokens, 8 one-tile images."""
    from engine import Engine, EngineConfig
    from model import Embedder

    dtype = compute_dtype()
    src, converted = checkpoint(size, dtype=dtype)
    embedder = Embedder(converted, dtype=dtype)
    engine = Engine(embedder, EngineConfig.for_backend(max_length=768, max_batch_tokens=8192, max_tiles=8))
    tile = embedder.config.force_image_size
    workloads = {
        "64 queries ~16 tok": [{"text": text_of_tokens(embedder.prompter, 13, i), "input_type": "query"} for i in range(64)],
        "16 passages ~512 tok": [{"text": text_of_tokens(embedder.prompter, 508, 100 + i), "input_type": "passage"}
                                 for i in range(16)],
        "8 image tiles": [{"image": picture(tile, tile, 200 + i), "input_type": "passage"} for i in range(8)],
    }
    return ModelBench(src, embedder, engine, workloads)


def text_of_tokens(prompter, n_tokens: int, seed: int) -> str:
    """Random words, grown until the tokenizer makes about `n_tokens` tokens of them."""
    rng = np.random.default_rng(seed)
    words = list(rng.choice(WORDS, n_tokens))
    while len(prompter.tokenizer.encode(" ".join(words)).ids) > n_tokens:
        words.pop()
    return " ".join(words)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * a * 6.28 + rng.uniform(0, 6)) * np.cos(y * b * 6.28) for a, b in rng.uniform(1, 9, (3, 2))]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def cpu_seconds(root: int | None) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc); NaN when unknown."""
    if root is None or not Path("/proc").is_dir():
        return float("nan")
    parent, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parent[pid], cpu[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # utime + stime
    total = 0
    for pid in cpu:
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        total += cpu[pid] if p == root else 0
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, cache: Path, env: dict[str, str] | None = None, root: Path = ROOT,
                 log_name: str = "server.log", target: str | None = None,
                 answers: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` of `root` (this checkout, or another one to compare with) on a free port, once ready.

    `target`: another service to serve (`module:Class`) instead of the repository's. `answers`: for a service
    without the health routes, a body for /v1/embeddings; ready once it is answered with 200.
    """
    import httpx

    port = free_port()
    env = {**os.environ, "EMBED_MODEL": str(model_dir), "EMBED_COMPILATION_CACHE": str(cache),
           "EMBED_CACHE_DIR": str(cache.parent), **(env or {})}
    log = open(cache.parent / log_name, "w")
    bentoml = str(Path(sys.executable).with_name("bentoml"))  # the one installed beside this Python
    proc = subprocess.Popen([bentoml, "serve", *([target] if target else []), "--port", str(port)], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800
    while time.time() < deadline:
        try:
            if answers is not None:
                if httpx.post(f"{url}/v1/embeddings", json=answers, timeout=30).status_code == 200:
                    return proc, url
            elif httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200:
                return proc, url
            else:
                live = httpx.get(f"{url}/v1/health/live", timeout=5)
                if live.status_code == 503:  # the model failed to load: it never becomes ready
                    os.killpg(proc.pid, 15)
                    raise RuntimeError(f"server failed: {live.json().get('message')}; see {cache.parent / log_name}")
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {cache.parent / log_name}")
        time.sleep(2)
    raise TimeoutError("server not ready")
