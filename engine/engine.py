"""The engine between the service and the model: it owns the batching policy.

One `embed` call takes the inputs of many requests and:
1. prepares them on the host in a thread pool with the model's processor (image decode, RGB, tiling, tokenisation;
   the same for every door): a bad input becomes an error in its own slot, never an exception for its batch-mates;
2. sorts them by length and packs them into forward passes under a padded-token budget, text and image inputs
   apart (text passes never run the vision tower);
3. pads every pass to a precompiled bucket (`BucketPlan`), so nothing compiles while serving;
4. dispatches the passes asynchronously, so the host collates pass k+1 while the device runs pass k.

It knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from engine import compilation_cache, programs
from engine.buckets import BucketPlan
from engine.programs import ProgramStore
from model.batching import PreparedInput
from model.embedder import Embedder
from model.tokenization import InputTooLongError
from model.network import make_staged

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineItem:
    """One input as the engine receives it.

    `image` may be encoded bytes (decoded in the pool) or a PIL image. `token_ids`, when the caller has already
    tokenised the prompt (to validate it and count usage), are used as they are instead of `text`.
    """

    text: str | None = None
    token_ids: Sequence[int] | None = None
    image: bytes | Image.Image | None = None
    input_type: str = "passage"
    truncate: str = "NONE"
    max_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_length: int = 10240
    max_batch_tokens: int = 16384
    max_rows: int = 64
    max_tiles: int = 8
    row_factor: int = 2
    pass_overhead_tokens: int = 64  # what launching one more forward pass costs, in computed tokens
    host_threads: int = 4
    image_formats: tuple[str, ...] | None = None  # Pillow formats an encoded image may be (None: any)
    # Ready once the programs of one input alone are compiled (`Engine.early_keys`); the rest compile in the
    # background, and a pass that needs one of them first compiles it then (counted as after ready).
    ready_early: bool = False

    @classmethod
    def for_backend(cls, backend: str | None = None, **overrides) -> EngineConfig:
        """Defaults that suit the backend: large passes on a GPU, small ones on a CPU."""
        backend = backend or jax.default_backend()
        base = dict(max_batch_tokens=65536, max_rows=128, max_tiles=32) if backend == "gpu" else \
            dict(max_batch_tokens=8192, max_rows=64, max_tiles=8)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


class Observer(Protocol):
    """Hooks for metrics; every method is optional."""

    def on_compile(self, kind: str, seconds: float, after_ready: bool) -> None: ...
    def on_pass(self, kind: str, rows: int, length: int, inputs: int, real_tokens: int, tiles: int,
                seconds: float) -> None: ...
    def on_retry(self, inputs: int) -> None: ...


@dataclasses.dataclass
class EngineStats:
    compilations: int = 0
    compilations_after_ready: int = 0
    programs_loaded: int = 0  # bucket executables loaded from the program store instead of compiled
    passes: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    warmup_seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


class Engine:
    def __init__(self, embedder: Embedder, config: EngineConfig | None = None, observer: Observer | None = None):
        self.embedder = embedder
        self.config = config or EngineConfig.for_backend()
        self.observer = observer
        cfg = embedder.config
        # The shortest prompt holding an image: BOS, prefix, <img>, one tile, </img>, space.
        shortest_image = len(embedder.prompter.encode(None, 1, "passage"))
        max_tiles = max(self.config.max_tiles, embedder.num_tiles_max)
        self.plan = BucketPlan(
            max_length=self.config.max_length,
            max_batch_tokens=max(self.config.max_batch_tokens, self.config.max_length),
            max_rows=self.config.max_rows, max_tiles=1 << (max_tiles - 1).bit_length(),
            min_image_length=shortest_image, row_factor=self.config.row_factor,
            tokens_per_tile=cfg.tokens_per_tile, max_tiles_per_image=embedder.num_tiles_max,
        )
        self.feature_capacity = self.plan.max_tiles
        self.stats = EngineStats()
        self.ready = False
        self._staged = make_staged(embedder.graphdef)
        self._compiled: dict[tuple, Any] = {}
        self._compiling: dict[tuple, Future] = {}  # one compilation per bucket, whoever asks for it meanwhile
        self._compile_lock = threading.Lock()
        self._background: threading.Thread | None = None
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(self.config.host_threads, thread_name_prefix="engine-host")
        self._tile_shape = (cfg.force_image_size, cfg.force_image_size, cfg.vision.num_channels)

    # ---- compilation ----------------------------------------------------------------------------------------
    def _executable(self, key: tuple, planned: bool = False) -> Any:
        """The compiled function for one bucket: loaded from the program store when it holds it, else compiled
        (and stored). Compiling here after ready, unless `planned` (the background warm-up), is counted as a miss."""
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        with self._compile_lock:
            if key in self._compiled:
                return self._compiled[key]
            pending = self._compiling.get(key)
            if pending is None:
                pending = self._compiling[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:  # another thread is compiling it: wait for that one
            return pending.result()
        try:
            fn, loaded, seconds = self._build(key)
        except BaseException as e:
            with self._compile_lock:
                del self._compiling[key]
            pending.set_exception(e)
            raise
        with self._compile_lock:
            self._compiled[key] = fn
            del self._compiling[key]
            if loaded:
                self.stats.programs_loaded += 1
            else:
                self.stats.compilations += 1
                missed = self.ready and not planned
                if missed:
                    self.stats.compilations_after_ready += 1
                    log.warning("compiled %s after ready (%.2fs): the bucket plan missed a shape, or the background "
                                "warm-up had not reached it", key, seconds)
                if self.observer:
                    self.observer.on_compile(key[0], seconds, missed)
        pending.set_result(fn)
        return fn

    def _build(self, key: tuple) -> tuple[Any, bool, float]:
        """(executable, whether it was loaded rather than compiled, seconds) for one bucket."""
        start = time.perf_counter()
        function, args, static = self._lower_args(key)
        store = self._programs
        fn = store.load(key, jax.tree_util.tree_structure((args, {}))) if store else None
        loaded = fn is not None
        if not loaded:
            # An XLA:CPU executable taken from JAX's persistent cache serializes without its code, and fails when
            # the next start runs it: one that will be stored is compiled afresh (the store replaces that cache).
            fresh = store is not None and jax.default_backend() == "cpu"
            with compilation_cache.bypassed() if fresh else contextlib.nullcontext():
                fn = function.lower(*args, **static).compile()
            if store:
                store.save(key, fn)
        return fn, loaded, time.perf_counter() - start

    @functools.cached_property
    def _programs(self) -> ProgramStore | None:
        """Where compiled programs are kept between starts (beside XLA's persistent cache), or None."""
        directory = compilation_cache.program_dir()
        if directory is None:
            return None
        embedder = self.embedder
        return ProgramStore(directory, {
            **programs.environment(), "code": programs.code_digest(),
            # The network's static structure (widths, eps, dtypes, attention kernels) without object addresses.
            "network": hashlib.sha256(re.sub(r" at 0x[0-9a-f]+", "", repr(embedder.graphdef)).encode()).hexdigest(),
            "config": repr(embedder.config), "dtype": embedder.dtype,
            "parameters": [(programs.param_name(p), tuple(v.shape), str(v.dtype))
                           for p, v in jax.tree_util.tree_leaves_with_path(embedder.state)],
            "checkpoint": embedder.manifest.get("files") or str(embedder.path.resolve()),
            "feature_capacity": self.feature_capacity, "tile": self._tile_shape,
        })

    def _lower_args(self, key: tuple) -> tuple[Any, tuple, dict]:
        """(jitted function, its arguments' shapes, static arguments) of one bucket."""
        state = self.embedder.state
        spec = jax.ShapeDtypeStruct
        kind = key[0]
        if kind == "vision":
            return (self._staged.vision, (state, spec((key[1], *self._tile_shape), jnp.uint8)),
                    {"capacity": self.feature_capacity})
        rows, length = key[1], key[2]
        ids, lengths = spec((rows, length), jnp.int32), spec((rows,), jnp.int32)
        if kind == "text":
            return self._staged.text, (state, ids, lengths), {}
        features = spec((self.feature_capacity * self.embedder.config.tokens_per_tile,
                         self.embedder.config.embedding_size), jnp.dtype(self.embedder.compute_dtype))
        return self._staged.multimodal, (state, ids, lengths, spec((rows, length), jnp.int32), features), {}

    def bucket_keys(self) -> list[tuple]:
        keys: list[tuple] = [("text", r, n) for r, n in self.plan.text_shapes()]
        keys += [("vision", t) for t in self.plan.tiles]
        keys += [("multimodal", r, n) for r, n in self.plan.image_shapes()]
        return keys

    def early_keys(self) -> list[tuple]:
        """The buckets compiled before ready with `ready_early`: every program one input alone needs (one row at
        every length, text or image, and every tile count of one image), so a single input of any size is served
        without compiling; batches of several may compile their bucket until the background warm-up reaches it."""
        one_image = self.plan.tiles_for(self.embedder.num_tiles_max)
        return [k for k in self.bucket_keys() if (k[1] <= one_image if k[0] == "vision" else k[1] == 1)]

    def warmup(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Compile every bucket (with `ready_early`, those of `early_keys`, the rest then in the background), then
        run one text and one image pass. Returns the seconds it took to be ready."""
        start = time.perf_counter()
        keys = self.bucket_keys()
        first = self.early_keys() if self.config.ready_early else keys
        # XLA compiles one executable on one core: compile as many at once as there are cores.
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            for i, _ in enumerate(pool.map(self._executable, first)):
                if progress:
                    progress(i + 1, len(first))
        side = self.embedder.config.force_image_size
        probe = [EngineItem(text="warm-up", input_type="query"),
                 EngineItem(image=Image.new("RGB", (side, side), (127, 127, 127)), input_type="passage")]
        for result in self.embed(probe):
            if isinstance(result, Exception):
                raise result
        self.stats.warmup_seconds = time.perf_counter() - start
        self.ready = True
        log.info("warm-up: %d of %d buckets ready in %.1fs (%d compiled, %d loaded from the program store)",
                 len(first), len(keys), self.stats.warmup_seconds, self.stats.compilations, self.stats.programs_loaded)
        rest = [k for k in keys if k not in set(first)]
        if rest:
            self._background = threading.Thread(target=self._compile_rest, args=(rest,), name="engine-warmup",
                                                daemon=True)
            self._background.start()
        return self.stats.warmup_seconds

    def _compile_rest(self, keys: list[tuple]) -> None:
        """The buckets left after an early ready, one at a time (a core stays free for serving), short ones first."""
        start = time.perf_counter()
        for key in sorted(keys, key=lambda k: (k[0] != "text", k[2] if len(k) > 2 else 0, k[1])):
            if self._closed.is_set():
                return
            try:
                self._executable(key, planned=True)
            except Exception as e:  # a pass that needs this bucket compiles it (and reports a failure) itself
                log.warning("background warm-up: %s failed: %s: %s", key, type(e).__name__, e)
        log.info("background warm-up: %d more buckets ready in %.1fs", len(keys), time.perf_counter() - start)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait for the background warm-up (if any); whether every bucket is now compiled."""
        if self._background is not None:
            self._background.join(timeout)
        return all(k in self._compiled for k in self.bucket_keys())

    # ---- host side ------------------------------------------------------------------------------------------
    def prepare(self, item: EngineItem) -> PreparedInput:
        """One input through the model's processor (model/processor.py: decode, RGB, tiles, prompt, tokens), the
        one every door uses; the engine adds only the image formats it was told to accept."""
        processor = self.embedder.processor
        formats = self.config.image_formats
        if item.token_ids is None:
            return processor.prepare(item.text, item.image, item.input_type, item.truncate, item.max_tokens,
                                     image_formats=formats)
        return processor.prepared_from_ids(item.token_ids, item.image, image_formats=formats)

    def submit(self, item: EngineItem | Callable[[], EngineItem]) -> Future:
        """Start preparing one input on the host pool now (a callable is called there first, e.g. to decode its
        base64); pass the future to `embed` in the item's place. Its result is a PreparedInput or the exception."""
        return self._pool.submit(self._prepare_safely, item)

    def _prepare_safely(self, item: EngineItem | Callable[[], EngineItem]) -> PreparedInput | Exception:
        try:
            prepared = self.prepare(item() if callable(item) else item)
        except Exception as e:  # one input's failure is reported in its own slot
            return e
        return self._fits(prepared)

    def _prepare_texts(self, items: list[EngineItem]) -> list[PreparedInput | Exception]:
        """Text-only inputs tokenised in one tokenizer call (in parallel, outside the GIL) instead of one pool task
        each; results as `_prepare_safely` gives them."""
        prepared = self.embedder.processor.prepare_texts([i.text for i in items], [i.input_type for i in items],
                                                         [i.truncate for i in items], [i.max_tokens for i in items])
        return [x if isinstance(x, Exception) else self._fits(x) for x in prepared]

    def _fits(self, prepared: PreparedInput) -> PreparedInput | Exception:
        if prepared.num_tokens > self.plan.lengths[-1]:
            return InputTooLongError(prepared.num_tokens, self.plan.lengths[-1])
        return prepared

    def pack(self, prepared: dict[int, PreparedInput]) -> list[tuple[bool, list[int]]]:
        """(is_image, input indices) per forward pass, text and image inputs apart.

        Inputs are sorted by length and cut into contiguous passes that minimise the computed tokens (rows and
        length padded to their buckets) plus a fixed cost per pass (`pass_overhead_tokens`), within the row, token
        and tile budgets: short inputs are not padded to a long one's length, and a few stragglers are not padded
        to a large row bucket, yet many tiny passes are not launched either. Dynamic programming over the sorted
        order, O(inputs × row cap).
        """
        passes: list[tuple[bool, list[int]]] = []
        plan = self.plan
        overhead = self.config.pass_overhead_tokens
        for image in (False, True):
            order = sorted((i for i, p in prepared.items() if (p.num_tiles > 0) == image),
                           key=lambda i: prepared[i].num_tokens)
            n = len(order)
            if not n:
                continue
            lengths = [plan.length_for(prepared[i].num_tokens, image) for i in order]
            # cost[length][k]: computed tokens of a pass of k inputs at that length, plus the pass's own cost
            cost = {n_: np.asarray(plan.row_table(n_, image), np.float64) * n_ + overhead for n_ in set(lengths)}
            tiles_before = np.concatenate([[0], np.cumsum([prepared[i].num_tiles for i in order])])
            best = np.full(n + 1, np.inf)  # best[j]: cost of packing order[:j]
            best[0] = 0.0
            cut = [0] * (n + 1)
            for j in range(1, n + 1):
                pass_cost = cost[lengths[j - 1]]  # sorted: the pass's last input is its longest
                first = max(j - (len(pass_cost) - 1), 0)
                if image:  # within the tile budget: tiles of order[i:j] <= max_tiles
                    first = max(first, int(np.searchsorted(tiles_before, tiles_before[j] - plan.max_tiles)))
                    first = min(first, j - 1)  # an image alone always makes a pass
                # candidates i = j-1, j-2, …, first (pass = order[i:j], k = j - i inputs); ties go to the shortest
                candidates = best[first:j][::-1] + pass_cost[1:j - first + 1]
                k = int(np.argmin(candidates))
                best[j], cut[j] = candidates[k], j - 1 - k
            j, found = n, []
            while j:
                found.append((image, order[cut[j]:j]))
                j = cut[j]
            passes += reversed(found)
        return passes

    # ---- device side ----------------------------------------------------------------------------------------
    def collate_pass(self, image: bool, members: list[PreparedInput]) -> tuple[tuple, Any]:
        """Host half of one pass: its bucket key and its inputs padded into that bucket."""
        plan = self.plan
        length = plan.length_for(max(p.num_tokens for p in members), image)
        rows = plan.rows_for(len(members), length, image)
        tiles = plan.tiles_for(sum(p.num_tiles for p in members)) if image else 0
        key = ("multimodal", rows, length, tiles) if image else ("text", rows, length)
        return key, self.embedder.collate(members, length=length, rows=rows, tiles=tiles)

    def launch(self, key: tuple, batch) -> jax.Array:
        """Device half of one pass: runs its precompiled executables; returns the (not yet ready) result."""
        state = self.embedder.state
        if key[0] == "multimodal":
            features = self._executable(("vision", key[3]))(state, batch.pixels)
            return self._executable(key[:3])(state, batch.input_ids, batch.lengths, batch.image_index, features)
        return self._executable(key)(state, batch.input_ids, batch.lengths)

    def _dispatch(self, image: bool, members: list[PreparedInput]):
        """Collate one pass into its bucket and launch it; returns the (not yet ready) device result."""
        key, batch = self.collate_pass(image, members)
        out = self.launch(key, batch)
        rows, length = key[1], key[2]
        real = sum(p.num_tokens for p in members)
        self.stats.passes += 1
        self.stats.real_tokens += real
        self.stats.computed_tokens += rows * length
        return out, (key[0], rows, length, len(members), real, key[3] if image else 0)

    def prepare_all(self, items: Sequence[EngineItem | Future]) -> list[PreparedInput | Exception]:
        """Every item prepared (a future from `submit` is waited for): plain text inputs in one tokenizer call
        here, the rest on the pool meanwhile; a failure sits in its item's slot."""
        texts = [i for i, item in enumerate(items) if isinstance(item, EngineItem) and item.text
                 and item.image is None and item.token_ids is None]
        # Token ids without an image only need checking: a pool task would cost more than the check.
        tokenised = [i for i, item in enumerate(items) if isinstance(item, EngineItem) and item.image is None
                     and item.token_ids is not None]
        batched = set(texts) | set(tokenised)
        futures = {i: item if isinstance(item, Future) else self.submit(item)
                   for i, item in enumerate(items) if i not in batched}
        results: list[Any] = [None] * len(items)
        for i in tokenised:
            results[i] = self._prepare_safely(items[i])
        if texts:
            for i, outcome in zip(texts, self._prepare_texts([items[i] for i in texts])):
                results[i] = outcome
        for i, future in futures.items():
            results[i] = _outcome(future)  # waited here, never in the pool
        return results

    def embed(self, items: Sequence[EngineItem | Future]) -> list[np.ndarray | Exception]:
        """One result per item, in order: an L2-normalised float32 vector, or the exception that item raised.

        An item may be a future from `submit` (preparation already started, e.g. while the previous call ran)."""
        return self.run(self.prepare_all(items))

    def run(self, prepared_all: Sequence[PreparedInput | Exception]) -> list[np.ndarray | Exception]:
        """`embed` for inputs that `prepare_all` prepared: the forward passes; an exception in a slot stays there."""
        results: list[Any] = list(prepared_all)
        prepared = {i: r for i, r in enumerate(results) if isinstance(r, PreparedInput)}
        launched = []
        for image, indices in self.pack(prepared):
            start = time.perf_counter()
            try:
                out, info = self._dispatch(image, [prepared[i] for i in indices])
            except Exception as e:  # a device failure fails only this pass's inputs, after a retry in halves
                self._retry(image, indices, prepared, results, e)
                continue
            launched.append((image, indices, out, info, start))
        for image, indices, out, info, start in launched:
            try:
                vectors = np.asarray(out)  # where an asynchronous device error (out of memory) surfaces
            except Exception as e:
                self._retry(image, indices, prepared, results, e)
                continue
            for row, i in enumerate(indices):
                results[i] = vectors[row]
            if self.observer:
                self.observer.on_pass(*info, seconds=time.perf_counter() - start)
        return results

    def _retry(self, image: bool, indices: list[int], prepared: dict[int, PreparedInput],
               results: list[np.ndarray | Exception], error: Exception) -> None:
        """Run a failed pass again as two halves, recursively: smaller passes use smaller buckets (less device
        memory), a transient fault gets another chance, and an input that breaks its pass is isolated. Only an
        input that still fails alone gets the error."""
        if len(indices) == 1:
            log.error("forward pass of one input failed: %s: %s", type(error).__name__, error)
            results[indices[0]] = error
            return
        log.warning("forward pass of %d inputs failed (%s: %s); retrying in halves", len(indices),
                    type(error).__name__, error)
        if self.observer and hasattr(self.observer, "on_retry"):
            self.observer.on_retry(len(indices))
        middle = len(indices) // 2
        for half in (indices[:middle], indices[middle:]):
            start = time.perf_counter()
            try:
                out, info = self._dispatch(image, [prepared[i] for i in half])
                vectors = np.asarray(out)  # synchronously: a retry is already the slow path
            except Exception as e:
                self._retry(image, half, prepared, results, e)
                continue
            for row, i in enumerate(half):
                results[i] = vectors[row]
            if self.observer:
                self.observer.on_pass(*info, seconds=time.perf_counter() - start)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(future: Future) -> PreparedInput | Exception:
    try:
        return future.result()
    except CancelledError as e:
        return e
