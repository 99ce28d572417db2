"""The engine's request queue: many callers submit inputs, one thread turns what is pending into forward passes.

    queue = BatchQueue(engine)
    future = queue.submit(items)        # any thread; a concurrent.futures.Future of one result per item
    results = future.result()           # an L2-normalised float32 vector, or the exception of that item alone

    pending = queue.enqueue(items, tokens, deliver)   # the same without a Future: deliver(results or exception)
    pending.withdraw()                                #   is called on the batch thread, unless withdrawn in time

Batching is continuous, as in text-embeddings-inference: while a batch runs, new requests wait; when it ends the
thread takes everything pending (up to `max_inputs` inputs and `max_tokens` tokens, whole requests only) into the
next `Engine.embed` call, which packs those inputs into precompiled buckets. Nothing waits for a batch to fill
unless `max_wait_s` asks for it, and then only while a batch has just ended and requests keep arriving (an idle server answers
a lone request at once). A caller that cancels its future before its batch starts takes no room in any pass.

`enqueue` is for callers that wait in their own way (an event loop resolves its futures once per batch, see
serving/runner.py): a `concurrent.futures.Future` per request costs a lock and a condition variable, and waking a
loop once per request costs a write to its self-pipe each time.

It knows nothing of HTTP: callers map an item's exception to whatever their protocol says.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Protocol, Sequence

from engine.engine import Engine, EngineItem

log = logging.getLogger(__name__)
# Requests that come together (the clients of the batch just answered, sending again; one event-loop turn's worth)
# arrive within a fraction of a millisecond of each other: a longer pause means nobody else is coming.
ARRIVAL_GAP_S = 0.0005


class QueueObserver(Protocol):
    """Hooks for metrics."""

    def on_depth(self, inputs: int) -> None: ...  # inputs queued or in the batch running
    def on_withdrawn(self, inputs: int) -> None: ...  # inputs whose request was cancelled before its batch
    def on_batch(self, queue_waits: list[float], inputs: int, tokens: int, seconds: float) -> None: ...


Results = list  # one result per item: an L2-normalised float32 vector or the exception of that item


class Pending:
    """One request in the queue. `withdraw()` (any thread) takes it out of every batch not yet started."""

    __slots__ = ("items", "tokens", "deliver", "claim", "submitted_at", "withdrawn")

    def __init__(self, items: Sequence[EngineItem | Future], tokens: int,
                 deliver: Callable[[Results | BaseException], None], claim: Callable[[], bool] | None):
        self.items, self.tokens, self.deliver, self.claim = items, tokens, deliver, claim
        self.submitted_at = time.perf_counter()
        self.withdrawn = False

    def withdraw(self) -> None:
        self.withdrawn = True  # read by the batch thread when it takes requests; a no-op once its batch started

    def _take(self) -> bool:
        return not self.withdrawn and (self.claim is None or self.claim())


class BatchQueue:
    def __init__(self, engine: Engine, *, max_inputs: int | None = None, max_tokens: int | None = None,
                 max_wait_s: float = 0.0, observer: QueueObserver | None = None):
        """`max_inputs`/`max_tokens`: what one `Engine.embed` call takes (default: two forward passes' worth, so
        that the host collates the second pass while the device runs the first)."""
        config = engine.config
        self.engine = engine
        self.max_inputs = max_inputs or 2 * config.max_rows
        self.max_tokens = max_tokens or 2 * max(config.max_batch_tokens, config.max_length)
        self.max_wait_s = max_wait_s
        self.observer = observer
        self._pending: collections.deque[Pending] = collections.deque()
        self._pending_inputs = 0
        self._pending_tokens = 0
        self._depth = 0  # inputs queued or in the running batch
        self._wake = threading.Condition()
        self._closed = False
        self._last_end = 0.0
        self._filling = False  # the batch thread is holding a partial batch (_wait_to_fill)
        self._thread = threading.Thread(target=self._run, name="batch-queue", daemon=True)
        self._thread.start()

    # ---- callers ------------------------------------------------------------------------------------------------
    def submit(self, items: Sequence[EngineItem | Future], tokens: int = 0) -> Future:
        """Queue one request's inputs (prepared items or futures from `Engine.submit`); `tokens`, its token count
        if known, sizes batches. Cancel the returned future to withdraw the request before its batch starts."""
        future: Future = Future()
        if not items:
            future.set_result([])
            return future

        def deliver(results: Results | BaseException) -> None:
            if isinstance(results, BaseException):
                future.set_exception(results)
            else:
                future.set_result(results)

        self._put(Pending(items, tokens, deliver, claim=future.set_running_or_notify_cancel))
        return future

    def enqueue(self, items: Sequence[EngineItem | Future], tokens: int,
                deliver: Callable[[Results | BaseException], None]) -> Pending:
        """Queue one request's inputs; `deliver` gets their results (or the batch's exception) on the batch thread,
        unless the request was withdrawn before its batch started. It must be quick and must not raise."""
        request = Pending(items, tokens, deliver, claim=None)
        if items:
            self._put(request)
        else:
            deliver([])
        return request

    def _put(self, request: Pending) -> None:
        items, tokens = request.items, request.tokens
        with self._wake:
            if self._closed:
                raise RuntimeError("the batch queue is closed")
            self._pending.append(request)
            self._pending_inputs += len(items)
            self._pending_tokens += tokens
            self._depth += len(items)
            depth = self._depth
            if not self._filling or self._full():
                self._wake.notify()
        if self.observer:
            self.observer.on_depth(depth)

    def __len__(self) -> int:
        """Inputs waiting for a batch."""
        return self._pending_inputs

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    # ---- the batch thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:  # empty when every request taken had been withdrawn
                self._embed(batch)

    def _next_batch(self) -> list[Pending] | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if self._closed and not self._pending:
                return None
            self._wait_to_fill()
            batch: list[Pending] = []
            inputs = tokens = withdrawn = 0
            while self._pending:
                request = self._pending[0]
                n = len(request.items)
                if batch and (inputs + n > self.max_inputs or tokens + request.tokens > self.max_tokens):
                    break
                self._pending.popleft()
                self._pending_inputs -= n
                self._pending_tokens -= request.tokens
                if not request._take():
                    withdrawn += n  # the client is gone or timed out: it never reaches the device
                    continue
                batch.append(request)
                inputs += n
                tokens += request.tokens
            self._depth -= withdrawn
        if withdrawn and self.observer:
            self.observer.on_withdrawn(withdrawn)
        return batch

    def _wait_to_fill(self) -> None:
        """Hold a partial batch while traffic is flowing (a batch ended moments ago) and requests keep arriving, each
        within ARRIVAL_GAP_S of the one before, for up to `max_wait_s` in all. Once arrivals pause, whoever was
        coming is here: holding longer would leave the device idle and fill nothing (clients that wait for their
        answers before sending again would simply wait longer)."""
        if self.max_wait_s <= 0 or time.perf_counter() - self._last_end > self.max_wait_s:
            return
        deadline = self._pending[0].submitted_at + self.max_wait_s
        gap = min(ARRIVAL_GAP_S, self.max_wait_s)
        while (not self._full() and not self._closed
               and (left := min(deadline, self._pending[-1].submitted_at + gap) - time.perf_counter()) > 0):
            self._filling = True  # submitters do not wake this thread for every request meanwhile, only when full
            self._wake.wait(left)
            self._filling = False

    def _full(self) -> bool:
        return self._pending_inputs >= self.max_inputs or self._pending_tokens >= self.max_tokens

    def _embed(self, batch: list[Pending]) -> None:
        start = time.perf_counter()
        items = [item for request in batch for item in request.items]
        try:
            results = self.engine.embed(items)
        except BaseException as e:  # the engine reports per-input failures itself; this is a bug or a dead device
            log.exception("a batch of %d inputs failed", len(items))
            for request in batch:
                request.deliver(e)
            return
        finally:
            self._last_end = time.perf_counter()
            with self._wake:
                self._depth -= len(items)
                depth = self._depth
            if self.observer:
                self.observer.on_depth(depth)
        offset = 0
        for request in batch:
            n = len(request.items)
            request.deliver(results[offset:offset + n])
            offset += n
        if self.observer:
            self.observer.on_batch([start - r.submitted_at for r in batch], len(items),
                                   sum(r.tokens for r in batch), self._last_end - start)
