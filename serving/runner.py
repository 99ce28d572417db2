"""Batch items -> vectors, or an error for each item that cannot be embedded. Knows nothing of HTTP or BentoML.

What crossed the batcher (token ids, and the image file's bytes in base64) becomes engine items; the engine
(engine/) decodes and tiles images on its thread pool, packs every input into precompiled buckets and answers each
item with its vector or its own exception, which becomes that item's error here.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image

from engine import Engine, EngineConfig, EngineItem
from model import Embedder, InputTooLongError
from serving.inputs import decode_base64
from serving.schemas import BatchItem, ItemError

logger = logging.getLogger(__name__)


class Runner:
    def __init__(self, embedder: Embedder, config: EngineConfig, observer=None):
        self.embedder = embedder
        self.engine = Engine(embedder, config, observer)

    def warmup(self) -> float:
        """Compile every bucket and run a text and an image pass: nothing compiles while serving."""
        return self.engine.warmup()

    def run(self, items: Sequence[BatchItem]) -> list[np.ndarray | ItemError]:
        """float32 [D] L2-normalised vectors, in item order; an ItemError for each item that failed."""
        outputs: list[np.ndarray | ItemError | None] = [None] * len(items)
        todo: list[tuple[int, EngineItem]] = []
        for i, item in enumerate(items):
            if not item.token_ids:
                outputs[i] = ItemError(status=400, message="token_ids must not be empty")
                continue
            try:
                image = decode_base64(item.image) if item.image is not None else None
            except ValueError as e:
                outputs[i] = ItemError(status=400, message=str(e))
                continue
            todo.append((i, EngineItem(token_ids=item.token_ids, image=image)))
        for (i, _), result in zip(todo, self.engine.embed([item for _, item in todo])):
            outputs[i] = result if isinstance(result, np.ndarray) else item_error(result)
        return outputs  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close()


def item_error(e: Exception) -> ItemError:
    """What the client is told about its input's own failure; anything unexpected is a logged 500."""
    if isinstance(e, Image.DecompressionBombError):
        return ItemError(status=400, message="image has too many pixels")
    if isinstance(e, (Image.UnidentifiedImageError, OSError, SyntaxError)):
        return ItemError(status=400, message="image data is corrupt and could not be decoded")
    if isinstance(e, (InputTooLongError, ValueError)):
        return ItemError(status=400, message=str(e))
    logger.error("embedding an input failed", exc_info=e)
    return ItemError(status=500, message="internal error while embedding the input")
