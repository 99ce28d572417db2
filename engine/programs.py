"""Compiled bucket programs kept on disk, so a warm start loads executables instead of tracing, lowering and
compiling them again.

XLA's persistent compilation cache already skips the compile, but it is looked up by the lowered program, so every
start still traces and lowers every bucket (most of a warm start). Here the executable itself is serialized
(`jax.experimental.serialize_executable`) under a fingerprint of everything the program depends on: the JAX and
jaxlib versions, the backend, its devices and XLA flags, the model's code, configuration, parameter shapes and
dtypes, the compute dtype, the checkpoint's files and the attention kernels chosen; each bucket is one file
named by its shape. A change of any of them is a different directory, so a stale program is never loaded.

The directory must be trusted as the code is: loading an executable can run anything it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import jax
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

# The packages whose code decides what a bucket program computes.
_CODE_DIRS = ("model", "engine")


def code_digest(root: Path | None = None) -> str:
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in _CODE_DIRS:
        for file in sorted((root / package).glob("*.py")):
            h.update(file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """What the executables depend on outside the model: versions, backend, devices, compiler settings."""
    import jaxlib

    devices = jax.devices()
    backend = devices[0].client
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "platform": backend.platform, "platform_version": backend.platform_version,
        "devices": [d.device_kind for d in devices],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": {k: str(getattr(jax.config, k)) for k in ("jax_default_matmul_precision", "jax_enable_x64")},
    }


def param_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ProgramStore:
    """Serialized executables of one model in one environment: `directory/<fingerprint>/<bucket>.exe`."""

    def __init__(self, directory: str | Path, parts: dict[str, Any]):
        self.directory = Path(directory) / fingerprint(parts)
        self.parts = parts

    @staticmethod
    def file_name(key: Iterable) -> str:
        return "-".join(str(k) for k in key) + ".exe"

    def load(self, key: tuple, in_tree) -> jax.stages.Compiled | None:
        """The stored executable for `key`, or None (absent, or unreadable: it is then compiled again)."""
        path = self.directory / self.file_name(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return serialize_executable.deserialize_and_load(blob, in_tree, jax.tree_util.tree_structure(0))
        except Exception as e:  # a truncated or foreign file: compiling again is always correct
            log.warning("stored program %s unusable (%s: %s): compiling it", path, type(e).__name__, e)
            return None

    def save(self, key: tuple, compiled: jax.stages.Compiled) -> None:
        try:
            blob, _, _ = serialize_executable.serialize(compiled)
        except (ValueError, NotImplementedError) as e:  # a backend that cannot serialize: compile every start
            log.warning("cannot store the program for %s: %s", key, e)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "fingerprint.json"
        if not manifest.exists():  # what the programs were made for, to read by eye
            write_atomically(manifest, json.dumps(self.parts, indent=1, sort_keys=True, default=str).encode())
        write_atomically(self.directory / self.file_name(key), blob)


def write_atomically(path: Path, data: bytes) -> None:
    """Another replica sharing the directory sees the whole file or none of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
