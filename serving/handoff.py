"""Inputs handed from `/v1/embeddings` to the batch function by reference, inside one worker process.

What crosses BentoML's batcher is a `BatchItem`, the public schema of `/embed_batch` (BentoML clients post it too).
The inputs of /v1/embeddings do not travel in it: a page image would go as megabytes of base64 to be decoded
again inside the batch, and decoding and tiling would wait for the batch (one batch runs at a time per worker).
Instead the request leaves its inputs here and sends only a key with each item:

- images start decoding and tiling on the engine's thread pool as soon as the request is validated, while the batch
  in flight runs (up to `early_tiles` tiles at once; beyond that they are prepared inside their batch, as before);
- the queue-wait timestamp and "is the request still waiting" live here, not in fields a BentoML client could set:
  an item whose request is over (answered, failed, timed out, client gone) has no entry and is skipped.

Only this process's own requests hold keys (random, unguessable); a key from elsewhere matches nothing.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Callable


@dataclasses.dataclass
class Handed:
    """One input left by a request for its batch."""

    token_ids: list[int]  # the whole prompt, image tokens included
    prepare: Callable[[], Future] | None = None  # starts decoding and tiling the image on the host pool when called
    tiles: int = 0  # the image's tiles (0 for text): what preparing it early holds in memory
    submitted_at: float | None = None  # when it was left here, for the queue-wait metric (None: never queued)
    early: bool = False  # prepared early, counted against the early budget until taken
    started: Future | None = None  # preparation started early, on the request's side


class Handoff:
    def __init__(self, early_tiles: int):
        self.early_tiles = early_tiles
        self._entries: dict[str, Handed] = {}
        self._early = 0  # tiles of inputs prepared early and not yet taken
        self._lock = threading.Lock()

    def put(self, handed: Handed) -> str:
        """Leave an input; start preparing it now if the early budget allows. Returns its key."""
        key = secrets.token_hex(16)
        handed.submitted_at = time.time()
        with self._lock:
            self._entries[key] = handed
            handed.early = handed.prepare is not None and self._early + handed.tiles <= self.early_tiles
            if handed.early:
                self._early += handed.tiles
        if handed.early:
            handed.started = handed.prepare()  # type: ignore[misc]
        return key

    def take(self, key: str) -> Handed | None:
        """The batch takes its input (None: the request is over, or the key is not this process's)."""
        with self._lock:
            handed = self._entries.pop(key, None)
            if handed is not None and handed.early:
                self._early -= handed.tiles
        return handed

    def discard(self, keys: list[str]) -> None:
        """The request is over: whatever its batch has not taken is dropped (and not prepared, if not started)."""
        for key in keys:
            handed = self.take(key)
            if handed is not None and handed.started is not None:
                handed.started.cancel()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def early_in_use(self) -> int:
        return self._early
