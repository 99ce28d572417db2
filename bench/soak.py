"""Soak and overload benchmark for the NIM service: hours of mixed traffic, then a burst at ~4x what it sustains.

    python bench/soak.py                          # starts `bentoml serve` on a tiny random checkpoint, 60 minutes
    python bench/soak.py --minutes 5              # shorter
    python bench/soak.py --url http://host:3000 --pid 1234    # an existing server (pid: to sample its memory)

Phase 1 (steady): `--concurrency` clients send mixed requests (text, images, text+image, every embedding type,
dimensions, truncation) back to back for `--minutes`. Answers are compared with the same request served alone at
the start (vectors within 1e-5, quantised values within one step, same order and usage): one in ten here, so that
checking does not take the CPU the server needs, every one in phase 2. The resident memory of
the server's processes (/proc/PID/status VmRSS, the supervisor and its workers) is sampled throughout; after the
warm-up (the first fifth) its least-squares slope is reported in MB/hour, and over the second half, which decides
the verdict (stable: under 1 % of the resident size per hour).
Phase 2 (overload): requests arrive at `--overload-factor` times the steady throughput, open loop (each at its
time, whether or not earlier ones were answered), for `--overload-seconds`: how many were shed (429/503), how
fast (as the client saw it, and as the server's access log timed it; also apart from the burst's first second, when
the client opens hundreds of connections at once), and whether every accepted one was still correct.
`--overload-rate` fixes the offered rate, to compare two servers (or settings, `--env`) at the same load.
The machine, the figures and the verdict are printed, and written as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx  # only for the simple synchronous calls
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine, picture  # noqa: E402
from serving.encoding import decode  # noqa: E402

MODEL_ID = "nvidia/llama-nemotron-embed-vl-1b-v2"
# The tiny checkpoint's limits, as the service tests use them (crossing a limit is exercised there, not here).
TINY_ENV = {"EMBED_DTYPE": "float32", "EMBED_MAX_TOKENS_TEXT": "256", "EMBED_MAX_TOKENS_IMAGE": "64",
            "EMBED_MAX_TOKENS_TEXT_IMAGE": "320"}
WORDS = "index table chart page scanned vector retrieval query passage model image text figure revenue".split()


# ---- the workload ------------------------------------------------------------------------------------------------------
def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def templates(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct mixed requests."""
    rng = random.Random(seed)
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    out = []
    for i in range(n):
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        kind = i % 7
        if kind == 0:
            body = {"input": [words(8)], "input_type": "query", "dimensions": rng.choice([16, 32, 64])}
        elif kind == 1:
            body = {"input": [words(rng.randint(20, 120)) for _ in range(rng.randint(1, 4))], "input_type": "passage",
                    "embedding_type": rng.choice(types), "encoding_format": rng.choice(["float", "base64"])}
        elif kind == 2:
            body = {"input": data_url(picture(rng.choice([64, 96, 128]), 64, i)), "encoding_format": "base64"}
        elif kind == 3:
            body = {"input": [f"{words(10)}\n{data_url(picture(128, 64, i))}", words(5)],
                    "modality": ["text_image", "text"], "embedding_type": rng.choice(types)}
        elif kind == 4:
            body = {"input": [words(400)], "truncate": rng.choice(["END", "START"])}
        elif kind == 5:
            body = {"input": [words(6) for _ in range(8)], "model": MODEL_ID + "-passage"}
        else:
            body = {"input": [data_url(picture(64, 64, i)), words(12)], "modality": ["image", "text"],
                    "embedding_type": "ubinary", "encoding_format": "base64"}
        out.append({"model": MODEL_ID, **body})
    return out


def same(request: dict, reference: dict, answer: dict) -> bool:
    """Same order, usage and vectors (quantised values within one step, binary vectors within one bit)."""
    n = len(request["input"]) if isinstance(request["input"], list) else 1
    if [d["index"] for d in answer["data"]] != list(range(n)) or answer["usage"] != reference["usage"]:
        return False
    kind = request.get("embedding_type", "float")
    for a, b in zip(reference["data"], answer["data"]):
        x, y = decode(a["embedding"], kind).astype(np.float64), decode(b["embedding"], kind).astype(np.float64)
        if x.shape != y.shape:
            return False
        if kind == "float" and not np.allclose(x, y, atol=1e-5, rtol=0):
            return False
        if kind in ("int8", "uint8") and np.abs(x - y).max() > 1:
            return False
        if kind in ("binary", "ubinary") and np.unpackbits(
                (x.astype(np.int64) & 255).astype(np.uint8) ^ (y.astype(np.int64) & 255).astype(np.uint8)).sum() > 1:
            return False
    return True


# ---- the server --------------------------------------------------------------------------------------------------------
def start_server(port: int, work: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    from conversion.random_checkpoint import write_random_checkpoint

    checkpoint = write_random_checkpoint(work / "tiny", size="tiny", seed=0, dtype="float32")
    env = {**os.environ, **TINY_ENV, "EMBED_MODEL": str(checkpoint), "EMBED_CACHE_DIR": str(work / "cache"),
           "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           **extra_env}
    log = open(work / "server.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not become ready")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_mb(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])  # kB
        except OSError:
            continue
    return total / 1024


# ---- load ----------------------------------------------------------------------------------------------------------
# aiohttp, bodies encoded once, answers checked after the phase: the client shares the machine with the server and
# must cost as little as possible (httpx with per-request JSON could not offer 4x load on 2 cores).
class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []  # of answered requests
        self.shed_latencies: list[float] = []  # of refused ones (429, 503)
        self.shed_sent: list[float] = []  # when each refused one left (time.monotonic())
        self.statuses: dict[str, int] = {}
        self.answers: list[tuple[int, bytes]] = []  # (template, body) of each 200, checked afterwards
        self.checked = self.wrong = 0

    def add(self, status: str, seconds: float | None = None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if seconds is not None:
            self.latencies.append(seconds)

    def percentiles(self) -> dict[str, float]:
        if not self.latencies:
            return {}
        q = np.percentile(self.latencies, [50, 90, 99])
        return {"p50_ms": round(q[0] * 1000, 1), "p90_ms": round(q[1] * 1000, 1), "p99_ms": round(q[2] * 1000, 1),
                "max_ms": round(max(self.latencies) * 1000, 1)}

    def check(self, work: list[Work], keep: int | None = None) -> None:
        """Compare the answers with the references (all of them, or an even sample of `keep`)."""
        answers = self.answers if keep is None or len(self.answers) <= keep else \
            self.answers[:: max(1, len(self.answers) // keep)]
        self.checked += len(answers)
        for index, body in answers:
            request, reference = work[index].request, work[index].reference
            if not same(request, reference, json.loads(body)):
                self.wrong += 1
        self.answers = []


class Work:
    def __init__(self, request: dict, reference: dict):
        self.request, self.reference = request, reference
        self.body = json.dumps(request).encode()
        self.inputs = len(request["input"]) if isinstance(request["input"], list) else 1


async def send(session, url: str, index: int, work: list[Work], tally: Tally) -> None:
    import aiohttp

    start, sent = time.perf_counter(), time.monotonic()
    try:
        async with session.post(f"{url}/v1/embeddings", data=work[index].body,
                                headers={"content-type": "application/json"}) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        tally.add(type(e).__name__)
        return
    seconds = time.perf_counter() - start
    if status == 200:
        tally.add("200", seconds)
        tally.answers.append((index, body))
    else:
        tally.add(str(status))
        if status in (429, 503):
            tally.shed_latencies.append(seconds)
            tally.shed_sent.append(sent)


def session(connections: int):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=300))


async def steady(url: str, work: list[Work], concurrency: int, seconds: float, pid: int | None,
                 sample_s: float) -> tuple[Tally, list[tuple[float, float]], float]:
    tally, memory = Tally(), []
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()

    async def client_loop(s, k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < deadline:
            await send(s, url, rng.randrange(len(work)), work, tally)
            if len(tally.answers) > 2000:  # check as we go: bounded client memory on hour-long runs
                tally.check(work, keep=200)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            if pid is not None:
                memory.append((time.monotonic() - t0, rss_mb(pid)))
            await asyncio.sleep(sample_s)

    async with session(concurrency) as s:
        await asyncio.gather(sampler(), *[client_loop(s, k) for k in range(concurrency)])
    tally.check(work, keep=200)
    return tally, memory, time.monotonic() - t0


async def overload(url: str, work: list[Work], rate: float, seconds: float) -> tuple[Tally, float, float, float]:
    """Open loop: request k leaves at k / rate seconds, answered or not. Returns the tally, the time until the last
    answer, the rate at which requests actually left (the client may fall behind its schedule) and when the phase
    began (time.monotonic())."""
    tally = Tally()
    rng = random.Random(1)
    async with session(4000) as s:
        t0, tasks, k = time.monotonic(), [], 0
        while (now := time.monotonic() - t0) < seconds:
            while k / rate <= now:
                tasks.append(asyncio.create_task(send(s, url, rng.randrange(len(work)), work, tally)))
                k += 1
            await asyncio.sleep(max(0.0, min(0.005, k / rate - now)))
        sent_rate = k / (time.monotonic() - t0)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    tally.check(work)  # every accepted answer
    return tally, elapsed, sent_rate, t0


def server_durations(log: Path, offset: int) -> dict[str, dict[str, float]]:
    """p50/p99 of the server's own durations (its JSON access log) by status, from `offset` on: how fast it answered
    once it read a request, apart from the time the request waited for the server to read it."""
    by_status: dict[str, list[float]] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            if line.startswith(b'{"time"'):
                entry = json.loads(line)
                if entry["path"] == "/v1/embeddings":
                    by_status.setdefault(str(entry["status"]), []).append(entry["duration_ms"])
    return {status: {"p50": round(float(np.percentile(d, 50)), 1), "p99": round(float(np.percentile(d, 99)), 1)}
            for status, d in by_status.items()}


def percentile_ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(seconds, q)) * 1000, 1) if seconds else None


def slope_mb_per_hour(memory: list[tuple[float, float]], skip_fraction: float = 0.2) -> tuple[float, float, float]:
    """(slope MB/h, its standard error, mean MB) of the samples after the first `skip_fraction`, by least squares."""
    kept = memory[int(len(memory) * skip_fraction):]
    if len(kept) < 3:
        return float("nan"), float("nan"), float("nan")
    t = np.array([s for s, _ in kept]) / 3600
    m = np.array([mb for _, mb in kept])
    a, b = np.polyfit(t, m, 1)
    fit = a * t + b
    stderr = float(np.sqrt(((m - fit) ** 2).sum() / (len(t) - 2) / ((t - t.mean()) ** 2).sum()))
    return float(a), stderr, float(m.mean())


# ---- main --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="an existing server (default: start one on a tiny random checkpoint)")
    ap.add_argument("--pid", type=int, help="with --url: the server's main process, to sample its memory")
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the steady phase")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in the steady phase")
    ap.add_argument("--templates", type=int, default=70, help="distinct requests in the mix")
    ap.add_argument("--overload-seconds", type=float, default=60.0)
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--overload-rate", type=float,
                    help="requests/s offered in the overload phase (default: the factor times the steady rate); fix "
                         "it to compare two servers at the same load")
    ap.add_argument("--sample-seconds", type=float, default=None, help="memory sampling period (default: ~200 samples)")
    ap.add_argument("--slope-limit", type=float, default=None,
                    help="MB/hour above which memory counts as growing (default: 1%% of the mean RSS per hour)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the started server (repeatable)")
    args = ap.parse_args(argv)

    proc, pid, url, log_path = None, args.pid, args.url, None
    if url is None:
        work = Path(tempfile.mkdtemp(prefix="soak-"))
        port = 3900 + os.getpid() % 1000
        proc = start_server(port, work, dict(kv.split("=", 1) for kv in args.env))
        url, pid, log_path = f"http://127.0.0.1:{port}", proc.pid, work / "server.log"
        print(f"server log: {log_path}", flush=True)
    try:
        wait_ready(url, proc)
        requests = templates(args.templates)
        with httpx.Client(base_url=url, timeout=120) as c:  # each request alone: the reference answers
            references = []
            for r in requests:
                response = c.post("/v1/embeddings", json=r)
                if response.status_code != 200:
                    raise SystemExit(f"reference request failed: {response.status_code} {response.text[:300]}")
                references.append(response.json())
        work = [Work(r, ref) for r, ref in zip(requests, references)]
        seconds = args.minutes * 60
        sample_s = args.sample_seconds or max(1.0, seconds / 200)
        print(f"steady: {args.concurrency} clients for {args.minutes:g} min on {url}", flush=True)
        tally, memory, elapsed = asyncio.run(steady(url, work, args.concurrency, seconds, pid, sample_s))
        answered = tally.statuses.get("200", 0)
        rate = answered / elapsed
        slope, stderr, mean_mb = slope_mb_per_hour(memory)  # after the warm-up (the first fifth)
        # The verdict reads the second half: allocator arenas and caches grow in steps early on, a leak grows
        # steadily and shows in the second half as much as anywhere.
        late, late_stderr, _ = slope_mb_per_hour(memory, 0.5)
        limit = args.slope_limit if args.slope_limit is not None else 0.01 * mean_mb
        verdict = "stable" if late <= limit else ("growing (not significant)" if late - 2 * late_stderr <= limit
                                                   else "growing")
        offered_rate = args.overload_rate or rate * args.overload_factor
        print(f"overload: {offered_rate:.1f} req/s for {args.overload_seconds:g} s", flush=True)
        log_offset = log_path.stat().st_size if log_path else 0
        over, over_elapsed, sent_rate, began = asyncio.run(overload(url, work, offered_rate, args.overload_seconds))
        # The burst's first second, when the client opens hundreds of connections at once, apart from the rest.
        later = [s for s, t in zip(over.shed_latencies, over.shed_sent) if t - began >= 1.0]
        server_side = server_durations(log_path, log_offset) if log_path else {}
        offered = sum(over.statuses.values())
        shed = over.statuses.get("429", 0) + over.statuses.get("503", 0)
        report = {
            "machine": machine(), "url": url, "minutes": args.minutes, "concurrency": args.concurrency,
            "steady": {"requests": sum(tally.statuses.values()), "statuses": tally.statuses,
                       "answers_checked": tally.checked, "wrong_answers": tally.wrong,
                       "requests_per_s": round(rate, 2),
                       "inputs_per_s": round(answered * np.mean([w.inputs for w in work]) / elapsed, 1),
                       **tally.percentiles()},
            "memory": {"samples": len(memory), "first_mb": round(memory[0][1], 1) if memory else None,
                       "last_mb": round(memory[-1][1], 1) if memory else None,
                       "mean_after_warmup_mb": round(mean_mb, 1), "slope_mb_per_hour": round(slope, 2),
                       "slope_stderr_mb_per_hour": round(stderr, 2),
                       "second_half_slope_mb_per_hour": round(late, 2),
                       "second_half_slope_stderr_mb_per_hour": round(late_stderr, 2),
                       "limit_mb_per_hour": round(limit, 2),
                       "verdict": verdict},
            "overload": {"target_requests_per_s": round(offered_rate, 2),
                         "sent_requests_per_s": round(sent_rate, 2), "offered": offered,
                         "seconds_to_last_answer": round(over_elapsed, 1), "statuses": over.statuses, "shed": shed,
                         "shed_fraction": round(shed / offered, 3) if offered else 0.0,
                         "accepted_per_s": round(over.statuses.get("200", 0) / over_elapsed, 2),
                         "accepted_checked": over.checked, "accepted_wrong_answers": over.wrong,
                         **{f"accepted_{k}": v for k, v in over.percentiles().items()},
                         "shed_p50_ms": percentile_ms(over.shed_latencies, 50),
                         "shed_p99_ms": percentile_ms(over.shed_latencies, 99),
                         "shed_after_first_second_p50_ms": percentile_ms(later, 50),
                         "shed_after_first_second_p99_ms": percentile_ms(later, 99),
                         "server_side_ms": server_side},
        }
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({**report, "memory_series": memory}, indent=1))
        healthy = tally.wrong == 0 and over.wrong == 0 and set(tally.statuses) == {"200"}
        print(f"verdict: memory {verdict}; answers {'all correct' if tally.wrong + over.wrong == 0 else 'WRONG'}")
        return 0 if healthy and verdict != "growing" else 1
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
