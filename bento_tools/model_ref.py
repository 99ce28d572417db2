"""`bento:NAME[:VERSION]`: a converted checkpoint stored as a BentoML model.

    EMBED_MODEL=bento:llama-nemotron-embed-vl-1b-v2            # the latest version in the model store
    EMBED_MODEL=bento:llama-nemotron-embed-vl-1b-v2:v3kq2x...  # one version

The model directory is a converted checkpoint (manifest.json, flax_params.safetensors, config.json, tokenizer files,
plus BentoML's model.yaml), so `conversion.resolve.resolve` uses it in place, without copying or converting.

Where it is looked up, first hit wins:
1. the active BentoML model store: `$BENTOML_HOME/models` (default ~/bentoml/models), or, in a process that serves a
   bento carrying models (`bentoml serve` of a containerized bento), that bento's own `models/` directory;
2. `$BENTO_PATH/models`: the models that `bentoml containerize` baked into the image (/home/bentoml/bento/models),
   also for other commands run in the container (`docker run IMAGE python -m conversion ...`).

Wiring (conversion/resolve.py, first lines of `fetch_source`; the import stays inside: this module imports
conversion.resolve, and bentoml is then imported only for `bento:` references):

    if str(path_or_repo_id).startswith("bento:"):  # a converted checkpoint stored as a BentoML model
        from bento_tools.model_ref import bento_model_dir

        return bento_model_dir(str(path_or_repo_id)), str(path_or_repo_id), None
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conversion.resolve import ModelNotFoundError

SCHEME = "bento:"


class BentoModelNotFoundError(ModelNotFoundError):
    """No stored BentoML model matches the reference."""


def is_bento_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEME)


def parse(ref: str) -> str:
    """`bento:NAME[:VERSION]` -> the BentoML tag `NAME:VERSION` (`NAME:latest` without a version)."""
    if not is_bento_ref(ref):
        raise ValueError(f"{ref!r} is not a BentoML model reference ({SCHEME}NAME[:VERSION])")
    tag = ref[len(SCHEME):].strip()
    name, _, version = tag.partition(":")
    if not name:
        raise ValueError(f"{ref!r} names no model: use {SCHEME}NAME[:VERSION]")
    return f"{name}:{version or 'latest'}"


def model_ref(tag: Any) -> str:
    """The EMBED_MODEL value for a stored model's tag (`Tag` or `NAME:VERSION`)."""
    return f"{SCHEME}{tag}"


def _stores(model_store: Any = None) -> list[Any]:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    stores = [model_store if model_store is not None else BentoMLContainer.model_store.get()]
    bento_path = os.environ.get("BENTO_PATH")
    if bento_path and (Path(bento_path) / "models").is_dir():
        stores.append(ModelStore(Path(bento_path) / "models"))
    return stores


def bento_model_dir(ref: str, model_store: Any = None) -> Path:
    """The directory of the stored model that `ref` names. `model_store`: a `ModelStore` to search first, instead
    of the active one (tests). Raises BentoModelNotFoundError naming where it looked."""
    from bentoml.exceptions import NotFound

    tag = parse(ref)
    searched = []
    for store in _stores(model_store):
        try:
            return Path(store.get(tag).path)
        except NotFound:
            searched.append(str(getattr(store, "_path", store)))
    raise BentoModelNotFoundError(
        f"no BentoML model {tag} (from EMBED_MODEL={ref}) in {' or '.join(searched)}. Store one with "
        f"`python -m bento_tools.store_model SRC --name {tag.split(':')[0]}`, pull it with "
        f"`bentoml models pull {tag}`, or import an exported one with `bentoml models import FILE`.")


def resolve_model_ref(ref: str | Path) -> str | Path:
    """`bento:` references become their model directory; anything else is returned unchanged."""
    return bento_model_dir(ref) if is_bento_ref(ref) else ref
