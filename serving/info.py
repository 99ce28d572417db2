"""Bodies of the informational routes: /v1/models, health, /v1/metadata, /v1/manifest, /v1/license, /v1/version."""

from __future__ import annotations

import functools
import tomllib
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from model import Embedder
from serving.encoding import allowed_dimensions
from serving.inputs import SUPPORTED_IMAGE_TYPES
from serving.schemas import ENCODING_FORMATS, INPUT_TYPES, MODALITIES, TRUNCATE_MODES
from serving.settings import Settings

PACKAGE = "nemotron-embed-vl-jax"
API_VERSION = "v1"
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
MODEL_LICENSES = (
    {"name": "NVIDIA Open Model License Agreement",
     "url": "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/"},
    {"name": "Llama 3.2 Community License Agreement", "url": "https://www.llama.com/llama3_2/license/",
     "notice": "Built with Llama. Llama 3.2 is licensed under the Llama 3.2 Community License, Copyright © Meta "
               "Platforms, Inc. All Rights Reserved."},
)
SOFTWARE_LICENSE = {"name": "Apache License 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}


@functools.lru_cache(maxsize=1)
def release() -> str:
    """The package version: installed metadata, else the pyproject.toml this checkout (or bento) carries."""
    try:
        return importlib_metadata.version(PACKAGE)
    except importlib_metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


def model_url(source: str) -> str:
    """A Hub id becomes its page; a local directory stays a path."""
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists():
        return f"https://huggingface.co/{source}"
    return source


def models(settings: Settings, created: int) -> dict[str, Any]:
    # `root` equal to `id`: LangChain's NVIDIA client picks the model by it.
    entry = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "nvidia",
             "root": settings.model_name}
    return {"object": "list", "data": [entry]}


def live(is_live: bool, reason: str | None = None) -> dict[str, Any]:
    return {"object": "health.response", "message": "live" if is_live else (reason or "not live"), "live": is_live}


def ready(is_ready: bool, reason: str | None = None) -> dict[str, Any]:
    return {"object": "health.response", "message": "ready" if is_ready else (reason or "not ready"),
            "ready": is_ready}


def version() -> dict[str, str]:
    return {"release": release(), "api": API_VERSION}


def metadata(settings: Settings, embedder: Embedder | None) -> dict[str, Any]:
    """Runtime, model and the limits in force. Model-dependent values are null until the model has loaded."""
    size = embedder.config.embedding_size if embedder is not None else None
    return {
        "version": release(),
        "api": API_VERSION,
        "modelInfo": [{"shortName": settings.model_name, "modelUrl": model_url(settings.model)}],
        "ready": embedder is not None,
        "limits": {
            "maxTokens": {m: settings.max_tokens(m) for m in MODALITIES},
            "maxInputsPerRequest": settings.max_inputs,
            "maxRequestBytes": settings.max_body_bytes,
            "maxImageBytes": settings.max_image_bytes,
            "maxImageDimensions": [settings.max_image_short_side, settings.max_image_long_side],
            "maxTiles": embedder.max_tiles if embedder is not None else settings.max_tiles,
        },
        "capabilities": {
            "modalities": list(MODALITIES),
            "inputTypes": list(INPUT_TYPES),
            "imageTypes": list(SUPPORTED_IMAGE_TYPES),
            "embeddingTypes": list(EMBEDDING_TYPES),
            "encodingFormats": list(ENCODING_FORMATS),
            "truncate": list(TRUNCATE_MODES),
            "embeddingSize": size,
            "dimensions": list(allowed_dimensions(size)) if size else None,
        },
        "batching": {"maxWaitMs": settings.max_wait_ms, "workers": settings.workers},
        "dtype": embedder.dtype if embedder is not None else settings.dtype,
    }


def manifest(settings: Settings, embedder: Embedder) -> dict[str, Any]:
    """What is served: the conversion's manifest (source, revision, file hashes, parameters, config, tool)."""
    return {"model": settings.model_name, "computeDtype": embedder.dtype, "maxTiles": embedder.max_tiles,
            **embedder.manifest}


def license_info(embedder: Embedder | None) -> dict[str, Any]:
    """The weights' licenses first (with the checkpoint's own LICENSE text when it ships one), then the software's."""
    texts = _license_files(embedder)
    main, llama = MODEL_LICENSES
    notice = (f"The model weights are governed by the {main['name']} ({main['url']}). Additional information: "
              f"{llama['name']} ({llama['url']}). {llama['notice']}")
    return {
        "name": main["name"],
        "url": main["url"],
        "type": "model",
        "content": texts[0][1] if texts else notice,
        **({"path": texts[0][0]} if texts else {}),
        "additional": [
            {"name": llama["name"], "url": llama["url"], "type": "model", "content": llama["notice"]},
            {"name": SOFTWARE_LICENSE["name"], "url": SOFTWARE_LICENSE["url"], "type": "software",
             "content": f"{PACKAGE} (this JAX/Flax reimplementation and its service) is licensed under the "
                        f"{SOFTWARE_LICENSE['name']}."},
        ],
    }


def _license_files(embedder: Embedder | None) -> list[tuple[str, str]]:
    if embedder is None:
        return []
    dirs = [embedder.path]
    source = embedder.manifest.get("source")
    if source and Path(source).is_dir():
        dirs.append(Path(source))
    found = []
    for d in dirs:
        for f in sorted(d.glob("LICENSE*")):
            if f.is_file():
                found.append((str(f), f.read_text(errors="replace")))
    return found
