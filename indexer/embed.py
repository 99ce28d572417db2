"""`python -m indexer embed`: embed every item of the inputs into a resumable Parquet index.

Batches of `batch_size` items go to the servers with at most `concurrency` requests in flight, as passages
(`input_type=passage`, `truncate=END`, an explicit per-item `modality`). Images and PDF pages are prepared on a
thread pool while earlier batches are on the wire. A request refused because of one input (400, 413, 500) is sent
again without it (the server names the input: `input[i]: ...`, else the batch is halved), so one bad file costs
itself only; it is reported as a failure and retried by the next run.

Ids must name one item each: two items with one id from different places (two JSONL records, a text id equal to
a file's path) stop the run before anything is sent, unless `allow_duplicate_ids` keeps the first of each. A run
that is cancelled (Ctrl-C in `python -m indexer`) stops sending, writes what was embedded, and leaves its report
marked `interrupted`: running again resumes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from indexer.client import HostNotFound, RequestFailed, ServerPool
from indexer.sources import DEFAULT_MAX_SIDE, Item, close_pdfs, corpus_root, discover, payload
from indexer.store import PartStore

ITEM_FAULT = frozenset({400, 413, 422, 500})  # statuses a single input can cause: isolate it
INPUT_INDEX = re.compile(r"^input\[(\d+)\]")


@dataclasses.dataclass
class EmbedOptions:
    servers: Sequence[str] = ("http://localhost:3000",)
    output: Path = Path("index.parquet")
    model: str | None = None  # None: the first server's /v1/models
    batch_size: int = 16
    concurrency: int = 4
    chunk_size: int = 1024  # rows per Parquet part file: what a crash can lose at most
    max_side: int = DEFAULT_MAX_SIDE
    max_retries: int = 8
    timeout_s: float = 300.0
    workers: int = 4  # threads preparing images
    id_field: str = "id"
    text_field: str = "text"
    api_key: str | None = None
    progress: bool | None = None  # None: when stderr is a terminal
    root: Path | None = None  # file ids are paths relative to it; None: recorded in the index, else the inputs'
    allow_duplicate_ids: bool = False  # keep the first item of an id seen in several places instead of stopping

ROOT_KEY = "indexer.root"  # index metadata: the corpus root of the first run, kept by the runs that resume it


@dataclasses.dataclass
class Report:
    output: str
    model: str = ""
    items: int = 0  # embedded by this run
    texts: int = 0
    images: int = 0
    pages: int = 0  # PDF pages (counted in items, not in images)
    skipped: int = 0  # already in the index
    duplicates: int = 0  # the same item reached twice (e.g. a file and its directory given): counted once
    failed: int = 0
    retries: int = 0
    requests: int = 0  # POST /v1/embeddings answered (any status, retries included)
    tokens: int = 0
    seconds: float = 0.0
    items_per_s: float = 0.0
    dimensions: int | None = None
    parts_written: int = 0
    root: str | None = None  # the corpus root that file ids are relative to
    interrupted: bool = False  # stopped before the end (Ctrl-C): what was embedded is stored, a rerun resumes
    servers: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # embedding requests, per server
    # One id in two places: {"id", "first", "other"}. Nothing is embedded unless allow_duplicate_ids.
    collisions: list[dict[str, str]] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"embedded {self.items} items ({self.texts} texts, {self.images} images, {self.pages} PDF pages) "
            f"in {self.seconds:.1f} s: {self.items_per_s:.1f} items/s",
            f"skipped {self.skipped} already indexed, {self.duplicates} given twice; {self.failed} failed; "
            f"{self.requests} requests, {self.retries} retries",
            f"index: {self.output}" + (f" ({self.dimensions}-d)" if self.dimensions else "") + f", model {self.model}",
        ]
        if self.interrupted:
            lines.insert(0, "interrupted")
        if self.collisions:
            lines.append(f"{len(self.collisions)} id collisions (one id naming different items):")
            lines += [f"  id {c['id']!r}: {c['first']} and {c['other']}" for c in self.collisions[:20]]
            if len(self.collisions) > 20:
                lines.append(f"  ... and {len(self.collisions) - 20} more (see the JSON report)")
        lines += [f"  failed {f['id']}: {f['error']}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the JSON report)")
        return "\n".join(lines)


class _Run:
    def __init__(self, opts: EmbedOptions, pool: ServerPool, store: PartStore, report: Report, progress):
        self.opts, self.pool, self.store, self.report, self.progress = opts, pool, store, report, progress
        self.threads = concurrent.futures.ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="indexer")

    def fail(self, item_id: str, source: str, error: str) -> None:
        self.report.failed += 1
        self.report.failures.append({"id": item_id, "source": source, "error": error})

    async def worker(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await queue.get()) is not None:
            results = await asyncio.gather(*(loop.run_in_executor(self.threads, _prepare, item, self.opts.max_side)
                                             for item in batch))
            ready: list[tuple[Item, str]] = []
            for item, (text, error) in zip(batch, results):
                if error is not None:
                    self.fail(item.id, item.source, error)
                    self.progress.update(1)
                else:
                    ready.append((item, text))
            await self.send(ready)

    async def send(self, batch: list[tuple[Item, str]]) -> None:
        while batch:
            items = [item for item, _ in batch]
            try:
                vectors, tokens = await self.pool.embed([p for _, p in batch], model=self.report.model,
                                                        input_type="passage",
                                                        modality=[item.modality for item in items])
            except RequestFailed as e:
                if e.status not in ITEM_FAULT:
                    if not isinstance(e, HostNotFound) and e.status in (None, 408, 429, 502, 503, 504):  # retries exhausted: a failure, next run retries
                        for item in items:
                            self.fail(item.id, item.source, str(e))
                        self.progress.update(len(items))
                        return
                    raise  # 401, 404 (model), ...: nothing will work, stop the run
                if len(batch) == 1:
                    self.fail(items[0].id, items[0].source, f"{e.status}: {e.message}")
                    self.progress.update(1)
                    return
                m = INPUT_INDEX.match(e.message)
                if m and int(m.group(1)) < len(batch):  # the server named the culprit: drop it, resend the rest
                    bad = int(m.group(1))
                    self.fail(items[bad].id, items[bad].source, f"{e.status}: {e.message}")
                    self.progress.update(1)
                    batch = batch[:bad] + batch[bad + 1:]
                    continue
                half = len(batch) // 2
                await self.send(batch[:half])
                batch = batch[half:]
                continue
            self.record(items, vectors, tokens)
            return

    def record(self, items: list[Item], vectors: np.ndarray, tokens: int) -> None:
        r = self.report
        if r.dimensions is None:
            r.dimensions = int(vectors.shape[1])
        elif vectors.shape[1] != r.dimensions:
            raise RuntimeError(f"the server answered {vectors.shape[1]}-d vectors after {r.dimensions}-d ones")
        self.store.add([i.id for i in items], [i.modality for i in items], vectors, [i.source for i in items])
        r.items += len(items)
        r.tokens += tokens
        r.pages += sum(1 for i in items if i.is_page)
        r.images += sum(1 for i in items if i.modality == "image" and not i.is_page)
        r.texts += sum(1 for i in items if i.modality == "text")
        self.progress.update(len(items))


def _prepare(item: Item, max_side: int) -> tuple[str | None, str | None]:
    try:
        return payload(item, max_side), None
    except Exception as e:  # unreadable image, broken page: this item fails, the run goes on
        return None, f"cannot read: {type(e).__name__}: {e}"


def _pending(inputs: Sequence[str | Path], opts: EmbedOptions, root: Path | None, done: set[str],
             report: Report | None, on_error, collisions: list[dict[str, str]] | None = None) -> Iterator[Item]:
    """The items not in the index yet, each id once: the first item of an id wins (counted in the report when one
    is given; a later item of that id from another place goes to `collisions`)."""
    seen: dict[str, tuple[tuple, str]] = {}
    for item in discover(inputs, id_field=opts.id_field, text_field=opts.text_field, on_error=on_error, root=root):
        first = seen.get(item.id)
        if first is not None:
            if first[0] != item.origin:
                if collisions is not None:
                    collisions.append({"id": item.id, "first": first[1], "other": item.where()})
            elif report is not None:
                report.duplicates += 1
            continue
        seen[item.id] = (item.origin, item.where())
        if item.id in done:
            if report is not None:
                report.skipped += 1
            continue
        yield item


async def run_embed(inputs: Sequence[str | Path], opts: EmbedOptions, report: Report | None = None) -> Report:
    """Embed what the index at opts.output lacks; returns the report, filled in also when an error stops the run.
    Pass a `report` to have it when the run is cancelled: the cancellation propagates, with everything embedded
    so far stored and the report marked `interrupted`."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    report = report if report is not None else Report(output=str(opts.output))
    report.output = str(opts.output)
    try:
        await _embed(inputs, opts, report, started, tqdm)
    except asyncio.CancelledError:
        report.interrupted = True
        raise
    return report


async def _embed(inputs: Sequence[str | Path], opts: EmbedOptions, report: Report, started: float, tqdm) -> None:
    async with ServerPool(opts.servers, concurrency=opts.concurrency, timeout_s=opts.timeout_s,
                          max_retries=opts.max_retries, api_key=opts.api_key) as pool:
        report.model = opts.model or await pool.model_id()
        store = PartStore(opts.output, chunk_size=opts.chunk_size,
                          metadata={"indexer.model": report.model, "indexer.input_type": "passage"})
        root = corpus_root(inputs, opts.root, store.recorded(ROOT_KEY))
        if root is not None:
            store.set_metadata(ROOT_KEY, str(root))
            report.root = str(root)
        done = store.ids()
        # First pass: count the work for the progress bar, find unreadable inputs and id collisions once.
        discovery_errors: list[tuple[str, str, str]] = []
        total = 0
        for _ in _pending(inputs, opts, root, done, None, lambda *e: discovery_errors.append(e), report.collisions):
            total += 1
            if total % 1024 == 0:
                await asyncio.sleep(0)  # a long discovery still answers Ctrl-C
        if report.collisions and not opts.allow_duplicate_ids:
            _totals(report, pool, store, started)
            return
        disable = None if opts.progress is None else not opts.progress
        with tqdm(total=total, unit="item", desc="embedding", disable=disable, file=sys.stderr) as progress:
            run = _Run(opts, pool, store, report, progress)
            for error in discovery_errors:
                run.fail(*error)
            queue: asyncio.Queue = asyncio.Queue(maxsize=2 * opts.concurrency)
            workers = [asyncio.create_task(run.worker(queue)) for _ in range(opts.concurrency)]
            try:
                batch: list[Item] = []
                for item in _pending(inputs, opts, root, done, report, lambda *e: None):
                    batch.append(item)
                    if len(batch) == opts.batch_size:
                        await _put(queue, batch, workers)
                        batch = []
                if batch:
                    await _put(queue, batch, workers)
                for _ in workers:
                    await _put(queue, None, workers)
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                store.flush()  # everything embedded so far, also when the run stops on an error
                run.threads.shutdown(wait=False, cancel_futures=True)
                close_pdfs()
                _totals(report, pool, store, started)


def _totals(report: Report, pool: ServerPool, store: PartStore, started: float) -> None:
    """The request counts of POST /v1/embeddings only, in the total and per server alike, so that they add up
    (the model lookup is not an embedding request)."""
    path = "/v1/embeddings"
    report.parts_written = store.parts_written
    report.retries = pool.retries_by_path[path]
    report.requests = sum(s.requests[path] for s in pool.servers)
    report.servers = {s.url: {"requests": s.requests[path], "errors": s.errors[path]} for s in pool.servers}
    report.seconds = round(time.monotonic() - started, 3)
    report.items_per_s = round(report.items / report.seconds, 3) if report.seconds > 0 else 0.0


async def _put(queue: asyncio.Queue, batch, workers: list[asyncio.Task]) -> None:
    """queue.put, but a worker that died (fatal error) stops the producer instead of leaving it blocked."""
    put = asyncio.ensure_future(queue.put(batch))
    while not put.done():
        for w in workers:
            if w.done() and not w.cancelled() and w.exception() is not None:
                put.cancel()
                raise w.exception()
        await asyncio.wait([put, *(w for w in workers if not w.done())], return_when=asyncio.FIRST_COMPLETED)


def write_report(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
