"""One corpus of PDF pages indexed five ways, side by side in one run: pages/s and what Ray adds per page.

    python bench/indexing.py [--size tiny] [--pages 24] [--max-side 1536] [--batch-size 8] [--url URL]

1. prepare only: render + PNG-encode every page in this process (`ray_pipeline.prepare_batch`, one core)
2. direct: the same preparation, then `Embedder.embed` in batches, in this process (a fresh Embedder: load and
   compilation included, as an actor pays them)
3. ray, in process: `python -m indexer ray` on a local Ray instance (one CPU actor), Ray's start timed apart
4. embed, HTTP: today's `python -m indexer embed` against a local `bentoml serve` of the same checkpoint
5. ray, HTTP: `python -m indexer ray --server` (actors sending to that server)

Ray's overhead per page = (3 without ray.init - 2) / pages, and (5 without ray.init - 4) / pages: scheduling,
the actor's start, object-store transfers and the driver's writes, over the same embedding work. On a corpus this
small the actor's start (a process, JAX, the model, compilation) dominates it: it is paid once per actor and run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import WORDS, checkpoint, machine, picture, scratch_dir
from server import start_server


def page(seed: int):
    """A document-like US-letter page at 100 dpi: lines of text and one figure (a picture with noise)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(image)
    figure_at = int(rng.integers(100, 600))
    for y in range(60, 1040, 16):
        if figure_at <= y < figure_at + 320:
            continue
        draw.text((70, y), " ".join(rng.choice(WORDS, 14)), fill="black")
    image.paste(picture(500, 300, seed), (175, figure_at + 10))
    return image


def make_corpus(root: Path, pages: int, per_pdf: int = 8) -> Path:
    """PDFs of `per_pdf` pages each (Pillow's PDF writer)."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    for d in range(-(-pages // per_pdf)):
        n = min(per_pdf, pages - d * per_pdf)
        images = [page(100 * d + i) for i in range(n)]
        images[0].save(docs / f"doc{d:03d}.pdf", "PDF", save_all=True, append_images=images[1:], resolution=100)
    return docs


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def direct(converted: Path, rows: pa.Table, max_side: int, batch_size: int, dtype: str) -> float:
    """Prepare and embed serially in this process, cold (load and compile included)."""
    import io

    from PIL import Image

    from indexer.ray_workers import prepare_batch
    from model import Embedder

    start = time.perf_counter()
    embedder = Embedder(converted, dtype=dtype)
    for i in range(0, rows.num_rows, batch_size):
        prepared = prepare_batch(rows.slice(i, batch_size), max_side)
        images = [Image.open(io.BytesIO(png)) for png in prepared.column("png").to_pylist()]
        embedder.embed([{"image": im, "input_type": "passage"} for im in images], truncate="END", max_tokens=2048)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid", "full"])
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--max-side", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--url", help="an already running server of the same checkpoint (skips starting one)")
    args = parser.parse_args()

    from indexer.__main__ import main as indexer
    from indexer.embed import Report
    from indexer.ray_pipeline import RayOptions, pending_rows, run_ray
    from indexer.ray_workers import prepare_batch
    from indexer.sources import close_pdfs

    load_start = os.getloadavg()[0]
    _, converted = checkpoint(args.size, dtype="float32")
    work = scratch_dir("bench-indexing-")
    proc = None
    url = args.url
    if url is None:  # started first, ready before anything is timed
        t = time.perf_counter()
        proc, url = start_server(converted, work / "xla")
        print(f"server ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    try:
        docs = make_corpus(work / "corpus", args.pages)
        rows = pending_rows([docs], RayOptions(), set(), Report(output=""))
        n = rows.num_rows
        results: dict[str, dict] = {}

        wall, _ = timed(lambda: prepare_batch(rows, args.max_side))
        close_pdfs()
        results["prepare only (1 core)"] = {"s": wall}
        results["direct, in process"] = {"s": direct(converted, rows, args.max_side, args.batch_size, "float32")}

        common = ["--max-side", str(args.max_side), "--batch-size", str(args.batch_size), "--no-progress"]
        rep = run_ray([docs], RayOptions(output=str(work / "ray.parquet"), checkpoint=str(converted),
                                         dtype="float32", max_side=args.max_side, batch_size=args.batch_size,
                                         progress=False))
        assert rep.items == n and rep.failed == 0, rep.summary()
        results["ray, in process"] = {"s": rep.seconds - rep.ray_init_s, "ray_init_s": rep.ray_init_s}

        report = work / "embed.json"
        wall, rc = timed(lambda: indexer(["embed", str(docs), "--output", str(work / "http.parquet"),
                                          "--server", url, "--report", str(report), *common]))
        assert rc == 0 and json.loads(report.read_text())["items"] == n
        results["embed, HTTP (today)"] = {"s": wall}

        rep = run_ray([docs], RayOptions(output=str(work / "ray_http.parquet"), servers=[url],
                                         max_side=args.max_side, batch_size=args.batch_size, progress=False))
        assert rep.items == n and rep.failed == 0, rep.summary()
        results["ray, HTTP"] = {"s": rep.seconds - rep.ray_init_s, "ray_init_s": rep.ray_init_s}
    finally:
        if proc is not None:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    print(f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} (other work on the "
          f"machine slows every way alike)")
    print(f"machine: {machine()}; checkpoint: random {args.size}, float32; {n} PDF pages rendered at "
          f"{args.max_side} px long side; batch {args.batch_size}")
    print()
    print("| way | seconds | pages/s | ray.init s (not in seconds) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        init = f"{r['ray_init_s']:.1f}" if "ray_init_s" in r else ""
        print(f"| {name} | {r['s']:.2f} | {n / r['s']:.2f} | {init} |")
    print()
    prep_ms = 1000 * results["prepare only (1 core)"]["s"] / n
    print(f"preparation (render + PNG) per page on one core: {prep_ms:.0f} ms")
    over_ip = 1000 * (results["ray, in process"]["s"] - results["direct, in process"]["s"]) / n
    over_http = 1000 * (results["ray, HTTP"]["s"] - results["embed, HTTP (today)"]["s"]) / n
    print(f"ray overhead per page, in process (ray - direct): {over_ip:.0f} ms")
    print(f"ray overhead per page, HTTP (ray - embed): {over_http:.0f} ms")
    print(f"ratio ray/direct pages/s, in process: "
          f"{results['direct, in process']['s'] / results['ray, in process']['s']:.2f}x")
    print(f"ratio ray/embed pages/s, HTTP: {results['embed, HTTP (today)']['s'] / results['ray, HTTP']['s']:.2f}x")


if __name__ == "__main__":
    main()
