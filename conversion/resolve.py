"""Turn a Hub repo id, a Hugging Face layout directory or a converted directory into a converted directory."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from conversion.convert import MANIFEST_FILE, convert, converted_format, is_converted, is_hf_checkpoint
from model.weights import FORMAT

DEFAULT_REPO_ID = "nvidia/llama-nemotron-embed-vl-1b-v2"
# What a conversion needs from the Hub repo: weights, configs, tokenizer and licence texts (no remote code).
HUB_PATTERNS = ["*.safetensors", "*.json", "LICENSE*", "*.md"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    root = os.environ.get("EMBED_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemotron-embed-vl"
    return Path(root)


# What to do instead of downloading: where this message goes (library, server), both work.
LOCAL_HINT = ("Use a local checkpoint directory in place of the Hub id (convert one where the Hub is reachable: "
              "python -m conversion {repo_id} OUT), or, for a trial without the real weights, a random one: "
              "python -m conversion.random_checkpoint /tmp/tiny --size tiny --dtype float32")


class ModelNotFoundError(RuntimeError):
    pass


def _reason(error: BaseException) -> str:
    """The innermost cause of a Hub error, in one line (huggingface_hub wraps the connection error twice)."""
    seen: set[int] = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_obtainable(repo_id: str, revision: str | None = None, timeout_s: float = 10.0) -> None:
    """Raise ModelNotFoundError at once, in one line, unless the Hub model is in the local Hugging Face cache or
    can be downloaded now (one metadata request; nothing is downloaded). For a server, before it starts: offline
    or with the Hub unreachable, the download would only fail later, inside a worker."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
        return
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local directory nor a Hugging Face repo id") from e
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{repo_id!r} is not in the local Hugging Face cache and downloads are off "
                                 f"(HF_HUB_OFFLINE=1)")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=timeout_s)
    except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError) as e:  # the Hub answered: no
        raise ModelNotFoundError(f"cannot download {repo_id!r} (revision {revision or 'main'}) from "
                                 f"{constants.ENDPOINT}: {str(e).strip().splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - no answer: the HTTP client's own errors (its package varies by version)
        raise ModelNotFoundError(f"{repo_id!r} is not in the local Hugging Face cache and the Hub "
                                 f"({constants.ENDPOINT}) is unreachable ({_reason(e)})") from e


def download(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """Download the checkpoint from the Hub (with a progress bar); returns (directory, commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    if Path(repo_id).is_absolute() or repo_id.startswith("."):
        raise ModelNotFoundError(f"model directory {repo_id} does not exist")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable ({_reason(e)}) and the model is not "
            f"in the local cache. {LOCAL_HINT.format(repo_id=repo_id)}") from e
    except HFValidationError as e:
        raise ModelNotFoundError(f"{repo_id!r} is neither a local directory nor a Hugging Face repo id") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {repo_id!r} (revision {revision or 'main'}): {e}") from e
    return path, path.name  # snapshots/<commit>


def _fingerprint(path: Path) -> str:
    """Changes when the checkpoint's files change, so a stale conversion is never reused."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def fetch_source(path_or_repo_id: str | Path, revision: str | None = None) -> tuple[Path, str, str | None]:
    """(local checkpoint directory, source as recorded in the manifest, Hub commit or None)."""
    if str(path_or_repo_id).startswith("bento:"):  # a converted checkpoint stored as a BentoML model
        from bento_tools.model_ref import bento_model_dir  # imports this module: import it late

        return bento_model_dir(str(path_or_repo_id)), str(path_or_repo_id), None
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path, str(path.resolve()), None
    local, commit = download(str(path_or_repo_id), revision)
    return local, str(path_or_repo_id), commit


def resolve(path_or_repo_id: str | Path, revision: str | None = None, progress: bool = True) -> Path:
    """A converted directory for `path_or_repo_id`, converting (and caching) on first use."""
    path, source, src_revision = fetch_source(path_or_repo_id, revision)
    if is_converted(path):
        return path
    if not is_hf_checkpoint(path):
        raise ModelNotFoundError(f"{path} is neither a converted model nor a Hugging Face checkpoint "
                                 "(no manifest.json, no config.json with model.safetensors[.index.json])")
    out = cache_root() / "converted" / _fingerprint(path)
    if is_converted(out) and converted_format(out) != FORMAT:
        # Made by an older version in another layout: this cache is ours to redo (a directory the user converted
        # is refused by the loader instead, with the command to convert it again).
        log.warning("%s holds converted format %r, not %r: converting %s again", out, converted_format(out), FORMAT,
                    path)
        (out / MANIFEST_FILE).unlink()
    if not is_converted(out):
        convert(path, out, source=source, revision=src_revision, progress=progress)
    return out
