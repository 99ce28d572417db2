"""One worker's model: the embedder, its engine and the engine's batch queue. Knows nothing of HTTP or BentoML.

Every door (/v1/embeddings, the BentoML client's `embed_batch`) hands validated, tokenised inputs to `embed`, which
queues them for the engine's batch thread and answers a vector or an `ItemError` per input. A page image starts
decoding and tiling on the engine's host pool as soon as it is queued, while the batch in flight runs, up to
`early_tiles` tiles at once (beyond that it is prepared inside its own batch): memory held ahead of the device stays
bounded whatever the queue holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Sequence

import numpy as np
from PIL import Image

from engine import Engine, EngineConfig, EngineItem
from engine.queue import BatchQueue
from model import Embedder, InputTooLongError
from serving.inputs import decode_base64
from serving.schemas import ItemError

logger = logging.getLogger(__name__)
# Tiles decoded ahead of their batch, in forward passes' worth (as admission's default of 16 passes in flight).
EARLY_PASSES = 16


class Runner:
    def __init__(self, embedder: Embedder, config: EngineConfig, observer=None, *, max_wait_s: float = 0.0,
                 fault_batch_delay_s: float = 0.0):
        """`observer`: the engine's and the queue's metrics hooks (serving.metrics.Metrics has both).
        `fault_batch_delay_s`: drills only, a slow device (every batch sleeps that long first)."""
        self.embedder = embedder
        self.engine = Engine(embedder, config, observer)
        if fault_batch_delay_s:
            self.queue: BatchQueue = _SlowDevice(self.engine, fault_batch_delay_s, max_wait_s=max_wait_s,
                                                 observer=observer)
        else:
            self.queue = BatchQueue(self.engine, max_wait_s=max_wait_s, observer=observer)
        self.early_tiles = EARLY_PASSES * self.engine.plan.max_tiles
        self._early = 0  # tiles being decoded or held ahead of their batch
        self._lock = threading.Lock()
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    def warmup(self) -> float:
        """Compile every bucket and run a text and an image pass: nothing compiles while serving."""
        return self.engine.warmup()

    async def embed(self, inputs: Sequence[tuple[list[int], str | None]]) -> list[np.ndarray | ItemError]:
        """(token ids, image base64 or None) per input -> its float32 [D] vector or its own error, in order.

        Cancelling the caller (client gone, timeout) withdraws the inputs that no batch has started yet."""
        items, tiles = self._items(inputs)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        mailbox = self._mailboxes.get(loop) or self._mailboxes.setdefault(loop, _Mailbox(loop))
        pending = self.queue.enqueue(items, sum(len(ids) for ids, _ in inputs), functools.partial(mailbox.post, future))
        try:
            results = await future
        finally:
            pending.withdraw()  # a no-op once its batch started
            if tiles:
                self._release(items, tiles)
        if isinstance(results, BaseException):
            raise results
        return [r if isinstance(r, np.ndarray) else item_error(r) for r in results]

    def embed_sync(self, inputs: Sequence[tuple[list[int], str | None]]) -> list[np.ndarray | ItemError]:
        """`embed` for a caller on a plain thread."""
        items, tiles = self._items(inputs)
        try:
            results = self.queue.submit(items, tokens=sum(len(ids) for ids, _ in inputs)).result()
        finally:
            if tiles:
                self._release(items, tiles)
        return [r if isinstance(r, np.ndarray) else item_error(r) for r in results]

    def _items(self, inputs: Sequence[tuple[list[int], str | None]]) -> tuple[list, int]:
        """Text inputs as they are; images as a future of their decoding when the early budget has room."""
        cfg = self.embedder.config
        items: list = []
        early = 0
        for ids, image in inputs:
            if image is None:
                items.append(EngineItem(token_ids=ids))
                continue
            lazy = functools.partial(_engine_item, ids, image)
            tiles = ids.count(cfg.img_context_token_id) // cfg.tokens_per_tile
            with self._lock:
                room = self._early + tiles <= self.early_tiles
                if room:
                    self._early += tiles
            if room:
                early += tiles
                items.append(self.engine.submit(lazy))
            else:
                items.append(lazy)  # the engine calls it on its pool when the batch prepares its inputs
        return items, early

    def _release(self, items: list, tiles: int) -> None:
        for item in items:
            if isinstance(item, Future):
                item.cancel()  # not started yet: never decoded
        with self._lock:
            self._early -= tiles

    def close(self) -> None:
        self.queue.close()
        self.engine.close()


class _Mailbox:
    """Results on their way from the batch thread to one event loop. The first request of a batch to finish wakes the
    loop; the others join the same wake-up, so the loop is woken once per batch, not once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._box: list[tuple[asyncio.Future, object]] = []
        self._lock = threading.Lock()

    def post(self, future: asyncio.Future, results: object) -> None:  # the batch thread
        with self._lock:
            self._box.append((future, results))
            first = len(self._box) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _deliver(self) -> None:  # the loop
        with self._lock:
            box, self._box = self._box, []
        for future, results in box:
            if not future.done():  # cancelled meanwhile: the client is gone or timed out
                future.set_result(results)


class _SlowDevice(BatchQueue):
    """A queue whose every batch waits `delay_s` before taking its inputs, as behind a slow device: timeouts, drains,
    withdrawals and overload can be drilled on a fast model."""

    def __init__(self, engine: Engine, delay_s: float, **kwargs):
        self.delay_s = delay_s
        super().__init__(engine, **kwargs)

    def _next_batch(self):
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
        time.sleep(self.delay_s)
        return super()._next_batch()


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
