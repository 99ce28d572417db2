"""The persistent compilation cache survives installing or removing `zstandard` (engine/compilation_cache.py).

Two fresh processes share one cache directory and compile the same function; they differ only in whether
`zstandard` is importable (hidden in one of them by a `sys.modules` entry, before JAX is imported). JAX's own
monitoring events count the hits and misses: the second process must hit what the first wrote, either way round.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys
if sys.argv[2] == "hidden":
    sys.modules["zstandard"] = None  # `import zstandard` now raises ImportError, as when it is not installed
try:
    import zstandard  # noqa: F401
    importable = True
except ImportError:
    importable = False

import jax
import jax.numpy as jnp
from jax import monitoring

from engine import configure_compilation_cache

events = []
monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
configure_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x) * 3.0 + jnp.cumsum(x))(jnp.arange(16.0)).block_until_ready()
print(json.dumps({"zstandard": importable, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def compile_in_child(cache: Path, zstandard: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cache), zstandard], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.parametrize("first,second", [("visible", "hidden"), ("hidden", "visible")])
def test_cache_is_reused_whether_or_not_zstandard_is_importable(tmp_path, first, second):
    import importlib.util

    assert importlib.util.find_spec("zstandard") is not None, \
        "zstandard must be installed for this test to compare both cases (it is in the test extra)"
    cache = tmp_path / "xla"
    a = compile_in_child(cache, first)
    b = compile_in_child(cache, second)
    assert (a["zstandard"], b["zstandard"]) == (first == "visible", second == "visible")
    assert a["misses"] >= 1 and a["hits"] == 0  # the first one compiled and wrote its entries
    assert any(cache.iterdir())
    assert b["hits"] == a["misses"] and b["misses"] == 0, (a, b)  # the second one compiled nothing


# A program whose XLA:CPU code has named fusions (a select feeding a reduction), compiled and stored the way the
# engine stores a bucket program (engine/programs.py), or loaded and run.
STORE_CHILD = r"""
import sys
import jax, jax.numpy as jnp
from jax.experimental import serialize_executable
from engine import compilation_cache, configure_compilation_cache

configure_compilation_cache(sys.argv[1])
f = jax.jit(lambda x, m: jnp.where(m[:, None], jnp.tanh(x) * 2.0, 0.0).sum(-1))
x, m = jnp.ones((8, 16)), jnp.arange(8) > 3
blob = sys.argv[1] + "/program.exe"
if sys.argv[2] == "run":
    compiled = serialize_executable.deserialize_and_load(
        open(blob, "rb").read(), jax.tree_util.tree_structure(((x, m), {})), jax.tree_util.tree_structure(0))
else:
    context = compilation_cache.bypassed() if sys.argv[2] == "store-fresh" else compilation_cache.contextlib.nullcontext()
    with context:
        compiled = f.lower(x, m).compile()
    if sys.argv[2] != "warm-cache":
        open(blob, "wb").write(serialize_executable.serialize(compiled)[0])
print(float(compiled(x, m).sum()))
"""


def _store_child(cache: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STORE_CHILD, str(cache), mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_a_stored_program_compiled_past_the_persistent_cache_runs_in_the_next_process(tmp_path):
    assert _store_child(tmp_path, "warm-cache").returncode == 0  # the persistent cache now holds the program
    stored = _store_child(tmp_path, "store-fresh")  # what Engine._build does on a CPU before storing
    assert stored.returncode == 0, stored.stderr[-2000:]
    loaded = _store_child(tmp_path, "run")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert float(loaded.stdout.split()[-1]) == float(stored.stdout.split()[-1])
    assert float(loaded.stdout.split()[-1]) == pytest.approx(4 * 16 * 2 * np.tanh(1.0), rel=1e-6)


def test_why_the_engine_bypasses_the_cache_for_a_program_it_stores(tmp_path):
    """The cache hit serializes without its code (JAX 0.10, XLA:CPU). Once this fails, the bypass can go."""
    assert _store_child(tmp_path, "warm-cache").returncode == 0
    assert _store_child(tmp_path, "store-from-cache").returncode == 0
    loaded = _store_child(tmp_path, "run")
    assert loaded.returncode != 0 and "not found" in loaded.stderr
