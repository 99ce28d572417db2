"""JAX's persistent compilation cache: the second start of a server loads its executables instead of compiling.

JAX compresses the entries with `zstandard` when that package is importable, else with zlib, and hashes the
choice into every cache key (jax/_src/compilation_cache.py, get_cache_key). Installing any package that pulls
`zstandard` in (a client library, for instance) would then change every key, and the next start would recompile
every bucket (minutes on a CPU). JAX has no setting for it, so the choice is pinned here to zlib, which Python
always has. On Python 3.14+ JAX uses the standard library's zstd and already keys it as "zlib": nothing to pin.
tests/test_compilation_cache.py checks that a cache written with `zstandard` importable is reused without it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax


_program_dir: Path | None = None


def configure_compilation_cache(directory: str | None, programs: bool = True) -> None:
    """Use `directory` as the persistent cache for every compilation (none if None), with a stable key.

    With `programs`, engines created afterwards also keep each bucket's executable in `directory/programs` (see
    engine/programs.py), which skips tracing and lowering too."""
    global _program_dir
    pin_cache_compression()
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _program_dir = Path(directory) / "programs" if directory and programs else None


def program_dir() -> Path | None:
    """Where engines keep their bucket executables (None: compile every start)."""
    return _program_dir


def bypassed():
    """A context (this thread only) whose compilations neither read nor write the persistent cache. JAX's own
    switch for it is internal; without it, a no-op."""
    from jax._src import config

    state = getattr(config, "enable_compilation_cache", None)
    return state(False) if callable(state) else contextlib.nullcontext()


def pin_cache_compression() -> str:
    """Make JAX compress cache entries, and key them, the same whether `zstandard` is importable or not.
    Returns the compression the keys name."""
    from jax._src import compilation_cache

    # Read when each key is computed and when an entry is (de)compressed, so setting it before compiling suffices.
    if getattr(compilation_cache, "zstandard", None) is not None:
        compilation_cache.zstandard = None
    return "zstandard" if getattr(compilation_cache, "zstandard", None) is not None else "zlib"
