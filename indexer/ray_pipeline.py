"""`python -m indexer ray`: offline embedding of a corpus on Ray Data, into Parquet or a LanceDB table.

    items (driver)  ->  prepare (CPU tasks)  ->  embed (actor pool)  ->  sink (driver, a chunk at a time)

- Items: what `indexer.sources.discover` finds in local inputs (the same ids as `python -m indexer embed`), and the
  same kinds of files under URIs that `pyarrow.fs` reads (`s3://`, `gs://`, `hdfs://`, `file://`), whose ids are
  paths relative to the URI given. Ids already in the sink are left out: a rerun resumes.
- Prepare: images scaled and PDF pages rendered by `sources.load_image` / `sources.render_pdf_page`, on CPU tasks
  anywhere in the cluster, and handed on as PNG bytes (lossless: the pixels a server would decode).
- Embed: an actor pool. By default each actor holds `model.Embedder` (one actor per GPU, `num_gpus=1`, when the
  cluster has GPUs; CPU actors otherwise); with servers given, each actor sends its batches to them over HTTP
  (`indexer.client.ServerPool`, same request as `python -m indexer embed`). Inputs are passages, truncated at the
  end to the server's token limits, so both ways give the server's vectors.
- Sink: the driver writes results as they stream in, `chunk_size` rows per Parquet part file or LanceDB commit, so
  a crash loses at most one chunk. Then, for LanceDB, the ANN index when the table is large enough.

Workers' code: indexer/ray_workers.py; inputs under URIs: indexer/remote.py; the LanceDB table: indexer/lance.py.
On a cluster (`RAY_ADDRESS` set) the files must be readable from every node: give URIs, or paths on a shared
filesystem; the same holds for `--checkpoint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from indexer.embed import Report
from indexer.ray_workers import ROWS, ModelEmbedder, ServerEmbedder, prepare_batch
from indexer.remote import is_uri, uri_items
from indexer.sources import DEFAULT_MAX_SIDE, discover

# The server's default token limits (serving/settings.py): in-process embedding truncates to the same.
DEFAULT_MAX_TOKENS_TEXT = 8192
DEFAULT_MAX_TOKENS_IMAGE = 2048
PREPARE_MEMORY = 512 * 2**20  # a preprocessing task: a few open PDFs, a 1536-px page and its PNG


@dataclasses.dataclass
class RayOptions:
    output: str = "index.parquet"
    sink: str = "parquet"  # "parquet": a PartStore directory (what `search` and `embed` read); "lance": LanceDB
    table: str = "pages"  # LanceDB table
    checkpoint: str | None = None  # in-process embedding (path or Hub id); ignored when servers are given
    dtype: str | None = None  # None: bfloat16 on GPUs, float32 on CPU
    servers: Sequence[str] = ()  # embed over HTTP with these servers instead
    model: str | None = None  # model id to request from servers (None: /v1/models)
    api_key: str | None = None
    timeout_s: float = 300.0
    max_retries: int = 8
    batch_size: int = 16  # inputs per embedding call (per request with servers)
    actors: int | None = None  # None: one per GPU; else 1 in-process CPU actor, or 2 per server
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs and embedding is in process
    cpus_per_actor: float | None = None  # None: 1 in process, 0.25 for HTTP actors (they mostly wait)
    prepare_batch_size: int = 8  # items per preprocessing call
    chunk_size: int = 1024  # rows per Parquet part / LanceDB commit: the most a crash can lose
    max_side: int = DEFAULT_MAX_SIDE
    id_field: str = "id"
    text_field: str = "text"
    max_tokens_text: int = DEFAULT_MAX_TOKENS_TEXT
    max_tokens_image: int = DEFAULT_MAX_TOKENS_IMAGE
    int8: bool = False  # LanceDB: also store int8 vectors
    binary: bool = False  # LanceDB: also store 1-bit vectors (packed, D/8 bytes)
    index_min_rows: int | None = None  # LanceDB: build the ANN index from this many rows (None: lance default)
    progress: bool | None = None  # None: when stderr is a terminal


@dataclasses.dataclass
class RayReport(Report):
    sink: str = "parquet"
    embedder: str = ""  # "in-process" or "servers"
    actors: int = 0
    gpus_per_actor: float = 0.0
    ray_init_s: float = 0.0  # connecting to (or starting) Ray
    index: dict[str, Any] | None = None  # the LanceDB ANN index built, if any

    def summary(self) -> str:
        lines = [super().summary(),
                 f"ray: {self.actors} {self.embedder} actors ({self.gpus_per_actor:g} GPU each), "
                 f"ray.init {self.ray_init_s:.1f} s"]
        if self.sink == "lance":
            lines.append(f"ANN index: {self.index}" if self.index else
                         "ANN index: none (table below the threshold: searches scan it exactly)")
        return "\n".join(lines)


# ---- items ----------------------------------------------------------------------------------------------------------
def pending_rows(inputs: Sequence[str | Path], opts: RayOptions, done: set[str], report: Report) -> pa.Table:
    """The items not in the sink yet, each id once (the first wins), as rows for the pipeline."""
    import tempfile

    rows: dict[str, list] = {name: [] for name in ROWS.names}
    seen: set[str] = set()

    def on_error(item_id: str, source: str, message: str) -> None:
        report.failed += 1
        report.failures.append({"id": item_id, "source": source, "error": message})

    local = [i for i in inputs if not is_uri(i)]
    with tempfile.TemporaryDirectory(prefix="indexer-ray-") as scratch:
        streams = [discover(local, id_field=opts.id_field, text_field=opts.text_field, on_error=on_error)] if local \
            else []
        streams += [uri_items(str(u), id_field=opts.id_field, text_field=opts.text_field, on_error=on_error,
                               scratch=Path(scratch)) for u in inputs if is_uri(u)]
        for stream in streams:
            for item in stream:
                if item.id in seen:
                    report.duplicates += 1
                    continue
                seen.add(item.id)
                if item.id in done:
                    report.skipped += 1
                    continue
                rows["id"].append(item.id)
                rows["modality"].append(item.modality)
                rows["source"].append(item.source)
                rows["location"].append(os.path.abspath(item.path) if item.path is not None else item.source)
                rows["page"].append(None if item.page is None else item.page + 1)
                rows["text"].append(item.text)
    return pa.Table.from_pydict(rows, schema=ROWS)


# ---- the run --------------------------------------------------------------------------------------------------------
def init_ray(num_cpus: int | None = None) -> float:
    """Connect to the cluster at RAY_ADDRESS, else start a local instance (no dashboard); seconds it took. A Ray
    already initialised in this process is used as it is."""
    import ray

    started = time.monotonic()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return time.monotonic() - started


def _open_sink(opts: RayOptions, metadata: dict[str, str]):
    if opts.sink == "lance":
        from indexer.lance import LanceSink

        return LanceSink(opts.output, opts.table, chunk_size=opts.chunk_size, int8=opts.int8, binary=opts.binary,
                         metadata=metadata)
    if opts.sink != "parquet":
        raise ValueError(f"sink must be 'parquet' or 'lance', got {opts.sink!r}")
    if opts.int8 or opts.binary:
        raise ValueError("int8/binary vectors are stored only in a LanceDB table (--sink lance)")
    from indexer.store import PartStore

    return PartStore(opts.output, chunk_size=opts.chunk_size, metadata=metadata)


def _server_model(opts: RayOptions) -> str:
    from indexer.client import ServerPool

    async def ask() -> str:
        async with ServerPool(opts.servers, concurrency=1, timeout_s=opts.timeout_s, max_retries=opts.max_retries,
                              api_key=opts.api_key) as pool:
            return await pool.model_id()

    return opts.model or asyncio.run(ask())


def _blocks(rows: pa.Table, parallelism: int, prepare_batch_size: int) -> list[pa.Table]:
    """Slices of the rows, enough of them that every CPU in the cluster has preprocessing to do."""
    if rows.num_rows == 0:
        return [rows]
    size = max(prepare_batch_size, min(1024, -(-rows.num_rows // max(1, 4 * parallelism))))
    return [rows.slice(i, size) for i in range(0, rows.num_rows, size)]


def run_ray(inputs: Sequence[str | Path], opts: RayOptions, report: RayReport | None = None) -> RayReport:
    """Embed what the sink at opts.output lacks, on Ray; returns the report. Pass a `report` to have it filled in
    also when the run stops on an error or Ctrl-C (what was embedded until then is stored either way)."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    started = time.monotonic()
    report = report if report is not None else RayReport(output=str(opts.output))
    report.output, report.sink = str(opts.output), opts.sink
    report.ray_init_s = round(init_ray(), 3)
    resources = ray.cluster_resources()
    cluster_gpus = int(resources.get("GPU", 0))
    if opts.servers:
        report.embedder = "servers"
        report.model = _server_model(opts)
        actors = opts.actors or 2 * len(opts.servers)
        gpus, cpus = opts.gpus_per_actor or 0.0, opts.cpus_per_actor if opts.cpus_per_actor is not None else 0.25
        actor_cls, kwargs = ServerEmbedder, dict(servers=list(opts.servers), model=report.model,
                                                 api_key=opts.api_key, timeout_s=opts.timeout_s,
                                                 max_retries=opts.max_retries)
    else:
        from conversion.resolve import DEFAULT_REPO_ID

        report.embedder = "in-process"
        checkpoint = opts.checkpoint or os.environ.get("EMBED_MODEL") or DEFAULT_REPO_ID
        if not os.environ.get("RAY_ADDRESS"):  # one machine: convert once here, not in every actor at once
            from conversion.resolve import resolve

            checkpoint = str(resolve(checkpoint))
        report.model = opts.model or _manifest_model(checkpoint) or checkpoint
        gpus = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if cluster_gpus else 0.0)
        actors = opts.actors or (max(1, int(cluster_gpus / gpus)) if gpus else 1)
        cpus = opts.cpus_per_actor if opts.cpus_per_actor is not None else 1.0
        actor_cls, kwargs = ModelEmbedder, dict(checkpoint=checkpoint, dtype=opts.dtype,
                                                max_tokens_text=opts.max_tokens_text,
                                                max_tokens_image=opts.max_tokens_image)
    report.actors, report.gpus_per_actor = actors, gpus

    sink = _open_sink(opts, {"indexer.model": report.model, "indexer.input_type": "passage"})
    rows = pending_rows(inputs, opts, sink.ids(), report)
    ctx = ray.data.DataContext.get_current()
    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    ctx.enable_progress_bars = False  # the driver's own bar below counts what is stored
    if not show:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        if rows.num_rows:
            ds = ray.data.from_arrow(_blocks(rows, int(resources.get("CPU", 1)), opts.prepare_batch_size))
            # Its own tasks, never fused into the actors (Ray fuses maps with equal resource requests): rendering
            # runs on every CPU in the cluster while the actors embed. The memory request is what tells them apart.
            ds = ds.map_batches(prepare_batch, batch_format="pyarrow", batch_size=opts.prepare_batch_size,
                                fn_kwargs={"max_side": opts.max_side}, num_cpus=1, memory=PREPARE_MEMORY)
            ds = ds.map_batches(actor_cls, batch_format="pyarrow", batch_size=opts.batch_size,
                                fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
                                num_gpus=gpus, num_cpus=cpus)
            with tqdm(total=rows.num_rows, unit="item", desc="embedding", disable=not show,
                      file=sys.stderr) as progress:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    _store(batch, sink, report, with_pages=opts.sink == "lance")
                    progress.update(batch.num_rows)
    finally:
        sink.flush()  # everything embedded so far, also when the run stops on an error
        report.parts_written = sink.parts_written
        report.seconds = round(time.monotonic() - started, 3)
        report.items_per_s = round(report.items / report.seconds, 3) if report.seconds > 0 else 0.0
    if opts.sink == "lance" and sink.table is not None:
        from indexer.lance import DEFAULT_INDEX_MIN_ROWS, build_index

        min_rows = DEFAULT_INDEX_MIN_ROWS if opts.index_min_rows is None else opts.index_min_rows
        if not sink.table.list_indices():
            report.index = build_index(sink.table, min_rows=min_rows)
        else:
            if report.items:  # new rows: fold them into the existing index
                sink.table.optimize()
            report.index = {"existing": [i.name for i in sink.table.list_indices()]}
    return report


def _manifest_model(checkpoint: str) -> str | None:
    import json

    manifest = Path(checkpoint) / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    return data.get("model") or data.get("source")


def _store(batch: pa.Table, sink, report: Report, *, with_pages: bool) -> None:
    """One block of results into the sink (LanceDB also keeps page numbers and texts), failures into the report."""
    errors = batch.column("error").to_pylist()
    ok = [i for i, e in enumerate(errors) if e is None]
    for i, e in enumerate(errors):
        if e is not None:
            report.failed += 1
            report.failures.append({"id": batch.column("id")[i].as_py(), "source": batch.column("source")[i].as_py(),
                                    "error": e})
    report.tokens += sum(batch.column("tokens").to_pylist())
    if not ok:
        return
    good = batch.take(pa.array(ok))
    column = good.column("embedding").combine_chunks()
    dims = set(column.value_lengths().unique().to_pylist())
    if len(dims) != 1 or (report.dimensions is not None and report.dimensions not in dims):
        raise RuntimeError(f"embeddings of different sizes: {sorted(dims)} (before: {report.dimensions})")
    report.dimensions = dims.pop()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(good.num_rows, report.dimensions)
    ids, modalities, sources, pages, texts = (good.column(c).to_pylist()
                                              for c in ("id", "modality", "source", "page", "text"))
    if with_pages:
        sink.add(ids, modalities, vectors, sources, pages=pages, texts=texts)
    else:
        sink.add(ids, modalities, vectors, sources)
    report.items += len(ok)
    report.pages += sum(1 for p in pages if p is not None)
    report.images += sum(1 for m, p in zip(modalities, pages) if m == "image" and p is None)
    report.texts += sum(1 for m in modalities if m == "text")
