"""Peak memory of converting a random checkpoint of the real shapes: conversion streams tensors, so the peak stays near
one tensor above the memory-mapped source.

    python bench/conversion_memory.py [--size full] [--workdir /tmp/conv-bench]

Writes a random checkpoint, converts it in a child process and prints the child's peak RSS next to the
checkpoint's size. Needs about 2× the checkpoint's size in free disk (3.4 GB each for `full`).
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="full", choices=["tiny", "mid", "full"])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="conv-bench-"))
    src, out = work / "hf", work / "converted"
    try:
        subprocess.run([sys.executable, "-m", "conversion.random_checkpoint", str(src), "--size", args.size,
                        "--dtype", "bfloat16"], check=True, cwd=ROOT)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "conversion", str(src), str(out), "--quiet"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the conversion
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}")
    print(f"| size | checkpoint | peak RSS | ratio | time |")
    print(f"|---|---|---|---|---|")
    print(f"| {args.size} | {size / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {peak / size:.2f}× | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
