"""Fail fast on a checkpoint that cannot load, before any worker starts.

`bentoml serve` imports service.py in its parent process first: a missing or corrupt local checkpoint found there
stops the server at once, exit status 1, with one line saying what is wrong. That is what a Kubernetes operator
wants: CrashLoopBackOff with the reason in `kubectl logs`, instead of a pod that looks alive while its worker
failed, or probes that keep a broken pod waiting for minutes. The checks read file headers only (no weights, no
device): a safetensors file's header says exactly how long the file must be, so a truncated copy is caught.

A Hub id (the default, when EMBED_MODEL is unset) is checked by `preflight_download`, which the service runs as a
BentoML deployment hook (in the parent process of `bentoml serve`, not at `bentoml build`): a model that is
neither in the local Hugging Face cache nor downloadable now (offline, Hub unreachable, unknown repo) stops the
server the same way, with the local alternatives in that one line, instead of a worker that fails its download
and sits unready. The check makes one metadata request when the model is not cached, and downloads nothing.

What only loading can tell (wrong shapes, a download cut short) is still reported by the worker: its
/v1/health/live answers 503 with the reason, so the liveness probe restarts it. A worker does not exit for it:
BentoML respawns a worker that exits (outside a container), which would loop inside one server instead of
restarting the pod visibly.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound
RANDOM_CHECKPOINT = ("python -m conversion.random_checkpoint /tmp/tiny --size tiny --dtype float32 && "
                     "EMBED_MODEL=/tmp/tiny bentoml serve")
logger = logging.getLogger(__name__)


class CheckpointError(Exception):
    pass


def looks_local(source: str) -> bool:
    """A path rather than a Hub id (`org/name` or `name`): absolute, relative with ./ or ~, existing, or with more
    slashes than a Hub id has."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).exists()


def check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path.name}: not a safetensors file (header length {header_len})")
            header = json.loads(f.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not an object)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise CheckpointError(f"{path.name}: {size} bytes, but its header describes {8 + header_len + end}: "
                              "the file is truncated or corrupt")


def check_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return value


def check_checkpoint(source: str) -> None:
    """Raise CheckpointError naming the problem with a local checkpoint; a Hub id is left to the worker."""
    path = Path(source).expanduser()
    if not looks_local(source):
        return
    if not path.exists():
        raise CheckpointError(f"{source} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{source} is not a directory")
    check_json(path / "config.json")
    check_json(path / "tokenizer.json")
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(check_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"shards named by {index.name} are missing: {', '.join(missing)}")
    if not weights:
        raise CheckpointError("no *.safetensors weights found")
    for file in weights:
        check_safetensors(file)


def preflight(source: str) -> None:
    """Stop the process with a one-line reason (SystemExit: no traceback) if the checkpoint cannot load."""
    try:
        check_checkpoint(source)
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"FATAL: cannot serve EMBED_MODEL={source}: {e}") from None


def preflight_download(source: str, revision: str | None = None) -> None:
    """Stop the process with a one-line reason and what to do (SystemExit: no traceback) if EMBED_MODEL is a Hub
    id that can be neither found in the local cache nor downloaded now."""
    from conversion.resolve import ModelNotFoundError, check_obtainable

    if source.startswith("bento:") or looks_local(source):
        return
    try:
        check_obtainable(source, revision)
    except ModelNotFoundError as e:
        logger.debug("the Hub check of %s failed", source, exc_info=True)
        raise SystemExit(f"FATAL: cannot serve EMBED_MODEL={source}: {e}. Set EMBED_MODEL to a local checkpoint "
                         f"directory (python -m conversion {source} OUT converts one where the Hub is reachable), "
                         f"or try the server offline with random weights: {RANDOM_CHECKPOINT}") from None
