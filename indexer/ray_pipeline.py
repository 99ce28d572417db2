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

On a cluster (`RAY_ADDRESS` set) the files must be readable from every node: give URIs, or paths on a shared
filesystem; the same holds for `--checkpoint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from indexer.embed import Report
from indexer.sources import (DEFAULT_MAX_SIDE, IMAGE_SUFFIXES, PDF_SUFFIXES, TEXT_SUFFIXES, Item, SourceError,
                             discover, load_image, pdf_page_count, render_pdf_page)

# The server's default token limits (serving/settings.py): in-process embedding truncates to the same.
DEFAULT_MAX_TOKENS_TEXT = 8192
DEFAULT_MAX_TOKENS_IMAGE = 2048
PREPARE_MEMORY = 256 * 2**20  # a preprocessing task: a few open PDFs, a 1536-px page and its PNG
ITEM_FAULT = frozenset({400, 413, 422, 500})  # statuses one input can cause (as in indexer.embed)
GAVE_UP = frozenset({None, 408, 429, 502, 503, 504})  # retries exhausted: those items fail, a rerun retries them

ROWS = pa.schema([
    pa.field("id", pa.string()), pa.field("modality", pa.string()), pa.field("source", pa.string()),
    pa.field("location", pa.string()),  # what the workers open: an absolute path or a URI
    pa.field("page", pa.int32()),  # PDF page number from 1
    pa.field("text", pa.string()),
])
PREPARED = ROWS.append(pa.field("png", pa.binary())).append(pa.field("error", pa.string()))
EMBEDDED = pa.schema([*(ROWS.field(n) for n in ("id", "modality", "source", "page", "text")),
                      pa.field("embedding", pa.list_(pa.float32())), pa.field("error", pa.string()),
                      pa.field("tokens", pa.int64())])


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
def is_uri(value: str | Path) -> bool:
    return "://" in str(value)


def _uri_items(uri: str, *, id_field: str, text_field: str, on_error, scratch: Path) -> Iterator[Item]:
    """The items under a URI: files like a local directory's (ids relative to it), texts like a local file's."""
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    scheme = uri.split("://", 1)[0]

    def uri_of(p: str) -> str:
        return f"{scheme}://{p}" if scheme != "file" else f"file://{p}"

    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        base = path.rstrip("/")
        files = sorted((f for f in filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
                        if f.type == pafs.FileType.File), key=lambda f: f.path)
        entries = [(f.path, f.path[len(base) + 1:]) for f in files]
        entries = [(p, rel) for p, rel in entries if not any(part.startswith(".") for part in rel.split("/"))]
    else:
        entries = [(path, path.rsplit("/", 1)[-1])]
        suffix = Path(path).suffix.lower()
        if suffix in TEXT_SUFFIXES:  # read the records on the driver, with the local reader's rules
            local = scratch / f"{len(list(scratch.iterdir()))}{suffix}"
            with filesystem.open_input_stream(path) as src, open(local, "wb") as dst:
                dst.write(src.read())
            for item in discover([local], id_field=id_field, text_field=text_field, on_error=on_error):
                yield dataclasses.replace(item, source=uri)
            return
        if suffix not in IMAGE_SUFFIXES and suffix not in PDF_SUFFIXES:
            raise SourceError(f"{uri}: not a directory, image, PDF, JSONL or Parquet file")
    for p, rel in entries:
        suffix = Path(p).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            yield Item(id=rel, modality="image", source=uri_of(p))
        elif suffix in PDF_SUFFIXES:
            try:
                with filesystem.open_input_file(p) as f:
                    pages = pdf_page_count(f.read())
            except Exception as e:  # corrupt or encrypted PDF: report it, go on with the rest
                on_error(rel, uri_of(p), f"cannot open PDF: {e}")
                continue
            for page in range(pages):
                yield Item(id=f"{rel}#page={page + 1}", modality="image", source=uri_of(p), page=page)


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
        streams += [_uri_items(str(u), id_field=opts.id_field, text_field=opts.text_field, on_error=on_error,
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


# ---- prepare (CPU tasks) --------------------------------------------------------------------------------------------
def _readable(location: str, fetched: dict[str, bytes]):
    """What the image/PDF readers open: a local path, or a URI's bytes (fetched once per batch)."""
    if not is_uri(location):
        return Path(location)
    if location not in fetched:
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(location)
        with filesystem.open_input_file(path) as f:
            fetched[location] = f.read()
    data = fetched[location]
    return data if location.lower().endswith(".pdf") else io.BytesIO(data)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)  # as sources.png_data_url: the same bytes a server is sent
    return buf.getvalue()


def prepare_batch(batch: pa.Table, max_side: int = DEFAULT_MAX_SIDE) -> pa.Table:
    """Rows -> rows with `png` (images, PDF pages) or `error` (unreadable): one bad file fails only itself."""
    pngs, errors, fetched = [], [], {}
    for location, page, modality in zip(batch.column("location").to_pylist(), batch.column("page").to_pylist(),
                                         batch.column("modality").to_pylist()):
        if modality == "text":
            pngs.append(None)
            errors.append(None)
            continue
        try:
            src = _readable(location, fetched)
            image = render_pdf_page(src, page - 1, max_side) if page is not None else load_image(src, max_side)
            pngs.append(png_bytes(image))
            errors.append(None)
        except Exception as e:
            pngs.append(None)
            errors.append(f"cannot read: {type(e).__name__}: {e}")
    return batch.append_column("png", pa.array(pngs, pa.binary())).append_column("error", pa.array(errors, pa.string()))


# ---- embed (actors) -------------------------------------------------------------------------------------------------
def _embedded(batch: pa.Table, vectors: list, errors: list, tokens: list) -> pa.Table:
    columns = [batch.column(n) for n in ("id", "modality", "source", "page", "text")]
    vec = pa.array([None if v is None else np.asarray(v, np.float32) for v in vectors], pa.list_(pa.float32()))
    return pa.Table.from_arrays([*columns, vec, pa.array(errors, pa.string()), pa.array(tokens, pa.int64())],
                                schema=EMBEDDED)


class ModelEmbedder:
    """An actor holding `model.Embedder`: passages, truncated at the end to the server's token limits."""

    def __init__(self, checkpoint: str, dtype: str | None, max_tokens_text: int, max_tokens_image: int):
        from model import Embedder

        self.embedder = Embedder.from_pretrained(checkpoint, dtype=dtype)
        self.max_tokens = {"text": max_tokens_text, "image": max_tokens_image}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        from model import EmbedInput

        n = batch.num_rows
        vectors: list = [None] * n
        errors = batch.column("error").to_pylist()
        tokens = [0] * n
        texts, pngs, modalities = (batch.column(c).to_pylist() for c in ("text", "png", "modality"))
        for modality in ("text", "image"):
            members = [i for i in range(n) if errors[i] is None and modalities[i] == modality]
            if not members:
                continue
            inputs = [EmbedInput(text=texts[i], image=Image.open(io.BytesIO(pngs[i])) if pngs[i] else None,
                                 input_type="passage") for i in members]
            for i, out in zip(members, self._embed(inputs)):
                if isinstance(out, Exception):
                    errors[i] = f"{type(out).__name__}: {out}"
                else:
                    vectors[i] = out
        return _embedded(batch, vectors, errors, tokens)

    def _embed(self, inputs: list, ) -> list:
        """Vectors, or for inputs that cannot be embedded (too long to truncate, ...) their exception."""
        limit = self.max_tokens["image" if inputs[0].image is not None else "text"]
        try:
            return list(self.embedder.embed(inputs, truncate="END", max_tokens=limit))
        except Exception:  # find the culprit: each input alone
            out: list = []
            for one in inputs:
                try:
                    out.append(self.embedder.embed([one], truncate="END", max_tokens=limit)[0])
                except Exception as e:
                    out.append(e)
            return out


class ServerEmbedder:
    """An actor that sends its batches to embedding servers, as `python -m indexer embed` does."""

    def __init__(self, servers: Sequence[str], model: str, api_key: str | None, timeout_s: float, max_retries: int):
        from indexer.client import ServerPool

        self.loop = asyncio.new_event_loop()
        self.model = model
        self.pool = ServerPool(servers, concurrency=1, timeout_s=timeout_s, max_retries=max_retries, api_key=api_key)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import base64

        n = batch.num_rows
        vectors: list = [None] * n
        errors = batch.column("error").to_pylist()
        tokens = [0] * n
        texts, pngs, modalities = (batch.column(c).to_pylist() for c in ("text", "png", "modality"))
        members = [i for i in range(n) if errors[i] is None]
        payloads = {i: texts[i] if modalities[i] == "text" else
                    "data:image/png;base64," + base64.b64encode(pngs[i]).decode("ascii") for i in members}
        self.loop.run_until_complete(self._send(members, payloads, modalities, vectors, errors, tokens))
        return _embedded(batch, vectors, errors, tokens)

    async def _send(self, members: list[int], payloads: dict, modalities: list, vectors: list, errors: list,
                    tokens: list) -> None:
        from indexer.client import RequestFailed

        if not members:
            return
        try:
            out, used = await self.pool.embed([payloads[i] for i in members], model=self.model,
                                              input_type="passage", modality=[modalities[i] for i in members])
        except RequestFailed as e:
            if e.status in ITEM_FAULT and len(members) > 1:  # one input's fault: isolate it, each alone
                for i in members:
                    await self._send([i], payloads, modalities, vectors, errors, tokens)
                return
            if e.status in ITEM_FAULT or e.status in GAVE_UP:
                for i in members:
                    errors[i] = str(e)
                return
            raise  # 401, 404 (model), ...: nothing will work, stop the run
        for i, v in zip(members, out):
            vectors[i] = v
        tokens[members[0]] = used

    def __del__(self):
        try:
            self.loop.run_until_complete(self.pool.aclose())
            self.loop.close()
        except Exception:
            pass


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


def run_ray(inputs: Sequence[str | Path], opts: RayOptions) -> RayReport:
    """Embed what the sink at opts.output lacks, on Ray; returns the report."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    started = time.monotonic()
    report = RayReport(output=str(opts.output), sink=opts.sink)
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
                    _store(batch, sink, report)
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
        else:  # new rows: fold them into the existing index
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


def _store(batch: pa.Table, sink, report: Report) -> None:
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
    if hasattr(sink, "table"):  # LanceDB keeps page numbers and texts
        sink.add(ids, modalities, vectors, sources, pages=pages, texts=texts)
    else:
        sink.add(ids, modalities, vectors, sources)
    report.items += len(ok)
    report.pages += sum(1 for p in pages if p is not None)
    report.images += sum(1 for m, p in zip(modalities, pages) if m == "image" and p is None)
    report.texts += sum(1 for m in modalities if m == "text")
