"""The model benchmarks run from a clean checkout with their one command, on the tiny checkpoint.

Only that they run and print their tables and ratios is checked here: their figures are timings, which belong in
bench/results/, never in an assertion.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "BENCH_CHECKPOINTS"}  # a scratch checkpoint, removed at exit
    done = subprocess.run([sys.executable, script, "--size", "tiny", *args], cwd=BENCH, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ratios(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^ratio (.+): ([0-9.]+)x", out, re.M)}


@pytest.mark.slow
def test_model_vs_reference_runs_and_agrees():
    out = run("model_vs_reference.py", "--repeats", "1")
    workloads = ("64 queries ~16 tok", "16 passages ~512 tok", "8 image tiles")
    found = ratios(out)
    assert set(found) == {f"Flax/PyTorch throughput, {w}" for w in workloads}
    assert all(r > 0 for r in found.values())
    first_table = [row for row in out.splitlines() if row.startswith(tuple(f"| {w} |" for w in workloads))][:3]
    cosines = [float(row.split("|")[-2]) for row in first_table]
    assert len(cosines) == 3 and min(cosines) >= 0.9999  # float32 on both sides: the same vectors
    assert "Matrix-product ceiling" in out and "needed / ceiling" in out


@pytest.mark.slow
def test_xla_flags_compares_every_set():
    out = run("xla_flags.py", "--repeats", "1", "--flags=", "--flags=--xla_cpu_enable_fast_min_max=false")
    assert "| (default) |" in out and "| --xla_cpu_enable_fast_min_max=false |" in out
    assert "failed" not in out
    line = next(row for row in out.splitlines() if row.startswith("ratio "))
    assert line.startswith("ratio default/(--xla_cpu_enable_fast_min_max=false) time: ")
    for w in ("64 queries ~16 tok", "16 passages ~512 tok", "8 image tiles"):
        assert re.search(re.escape(w) + r" [0-9.]+x", line)


@pytest.mark.slow
def test_python_api_bench_compares_both_paths():
    out = run("python_api.py", "--repeats", "2")
    workloads = ("1 query ~16 tok", "8 queries ~16 tok", "64 queries ~16 tok")
    assert set(ratios(out)) == {f"Python API/engine path throughput, {w}" for w in workloads}
    rows = [row for row in out.splitlines() if row.startswith(tuple(f"| {w} |" for w in workloads))]
    assert len(rows) == 3 and min(float(row.split("|")[-2]) for row in rows) >= 0.9999  # the same vectors


@pytest.mark.slow
def test_fp8_speed_runs_and_compares_both_dtypes():
    out = run("fp8_speed.py", "--rows", "2", "--length", "32", "--query-rows", "2", "--query-length", "16",
              "--tiles", "1", "--repeats", "1", "--ceiling-size", "128")
    rows = [row.split("|")[1:-1] for row in out.splitlines() if row.startswith("| ") and "x" in row]
    found = {(r[0].strip(), r[1].strip()) for r in rows}
    for workload in ("passages 2x32 tok", "queries 2x16 tok", "image tiles x1"):
        assert {(workload, d) for d in ("bfloat16", "fp8", "fp8 bf16-product")} <= found
    assert all(float(r[-1]) > 0.9 for r in rows)  # the FP8 passes compute the same vectors, give or take e4m3


@pytest.mark.slow
def test_fp8_accuracy_runs_and_reports_every_input_kind():
    out = run("fp8_accuracy.py", "--docs", "8", "--queries", "8", "--no-diagnostics")
    table = {row.split("|")[1].strip(): row for row in out.splitlines() if row.startswith("| ")}
    for kind in ("query", "passage ~2k tok", "image 6+1 tiles", "image+text", "**least**"):
        assert kind in table
    assert "fp8 channel/token (served) / bfloat16" in table


@pytest.mark.slow
def test_startup_bench_compiles_one_program_per_depth(tmp_path):
    log = tmp_path / "startup.log"
    done = subprocess.run([sys.executable, "startup.py", "compile", "--size", "tiny", "--layers", "2", "4",
                           "--rounds", "1", "--rows", "2", "--length", "16", "--log", str(log)],
                          cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["bench"] == "machine"
    assert [(r["code"], r["decoder_layers"]) for r in records[1:]] == [("after", 2), ("after", 4)]
    assert all(r["compile_cpu_s"] > 0 and r["hlo_kb"] > 0 for r in records[1:])
