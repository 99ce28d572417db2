"""Batch items -> vectors, or an error for each item that cannot be embedded. Knows nothing of HTTP or BentoML.

An input reaches the batch in one of two ways. `/v1/embeddings` leaves it in this worker's `Handoff` (token ids, and
the image's base64, whose decoding and tiling may already have started on the engine's pool) and only its key
crosses the batcher; a direct BentoML client sends token ids or text and the image's base64 in the item. Either way
the engine (engine/) packs every input into precompiled buckets and answers each with its vector or its own
exception, which becomes that item's error here.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import CancelledError, Future
from typing import Sequence

import numpy as np
from PIL import Image

from engine import Engine, EngineConfig, EngineItem
from model import Embedder, InputTooLongError
from serving.handoff import Handed, Handoff
from serving.inputs import decode_base64
from serving.schemas import ItemError

logger = logging.getLogger(__name__)
# Tiles that may be decoded and tiled ahead of their batch, in forward passes' worth (as admission's 16 passes).
EARLY_PASSES = 16


class Runner:
    def __init__(self, embedder: Embedder, config: EngineConfig, observer=None):
        self.embedder = embedder
        self.engine = Engine(embedder, config, observer)
        self.handoff = Handoff(early_tiles=EARLY_PASSES * self.engine.plan.max_tiles)

    def warmup(self) -> float:
        """Compile every bucket and run a text and an image pass: nothing compiles while serving."""
        return self.engine.warmup()

    def hand_over(self, token_ids: list[int], image_b64: str | None) -> str:
        """Leave a validated input for its batch (its image starts decoding now if the budget allows); its key."""
        return self.handoff.put(self.handed(token_ids, image_b64))

    def handed(self, token_ids: list[int], image_b64: str | None) -> Handed:
        """An input as a batch takes it, its image not yet being prepared (`hand_over` may start that)."""
        if image_b64 is None:
            return Handed(token_ids)
        cfg = self.embedder.config
        tiles = token_ids.count(cfg.img_context_token_id) // cfg.tokens_per_tile
        return Handed(token_ids, functools.partial(self._submit, token_ids, image_b64), tiles)

    def _submit(self, token_ids: Sequence[int], image_b64: str) -> Future:
        return self.engine.submit(functools.partial(_engine_item, token_ids, image_b64))

    def run(self, inputs: Sequence[Handed]) -> list[np.ndarray | ItemError]:
        """float32 [D] L2-normalised vectors, in input order; an ItemError for each input that failed."""
        outputs: list[np.ndarray | ItemError | None] = [None] * len(inputs)
        todo: list[tuple[int, EngineItem | Future]] = []
        for i, handed in enumerate(inputs):
            if not handed.token_ids:
                outputs[i] = ItemError(status=400, message="token_ids must not be empty")
            elif handed.started is not None:
                todo.append((i, handed.started))
            elif handed.prepare is not None:
                todo.append((i, handed.prepare()))
            else:
                todo.append((i, EngineItem(token_ids=handed.token_ids)))
        for (i, _), result in zip(todo, self.engine.embed([item for _, item in todo])):
            outputs[i] = result if isinstance(result, np.ndarray) else item_error(result)
        return outputs  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close()


def _engine_item(token_ids: Sequence[int], image_b64: str) -> EngineItem:
    return EngineItem(token_ids=token_ids, image=decode_base64(image_b64))  # ValueError: not valid base64


def item_error(e: Exception) -> ItemError:
    """What the client is told about its input's own failure; anything unexpected is a logged 500."""
    if isinstance(e, Image.DecompressionBombError):
        return ItemError(status=400, message="image has too many pixels")
    if isinstance(e, (Image.UnidentifiedImageError, OSError, SyntaxError)):
        return ItemError(status=400, message="image data is corrupt and could not be decoded")
    if isinstance(e, (InputTooLongError, ValueError)):
        return ItemError(status=400, message=str(e))
    if isinstance(e, CancelledError):
        return ItemError(status=499, message="the request is over")
    logger.error("embedding an input failed", exc_info=e)
    return ItemError(status=500, message="internal error while embedding the input")
