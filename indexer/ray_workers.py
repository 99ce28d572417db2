"""What runs on Ray's workers for `python -m indexer ray`: preprocessing tasks and the embedding actors.

`prepare_batch` (CPU tasks): images scaled and PDF pages rendered by `indexer.sources`, handed on as PNG bytes
(lossless: the pixels a server would decode). `ModelEmbedder` (an actor holding `model.Embedder`) and
`ServerEmbedder` (an actor sending to servers with `indexer.client.ServerPool`) embed them as passages, truncated at
the end, and isolate an input that fails so that it fails alone.
"""

from __future__ import annotations

import asyncio
import io
from typing import Sequence

import numpy as np
import pyarrow as pa

from indexer.remote import readable
from indexer.sources import DEFAULT_MAX_SIDE, load_image, render_pdf_page

ITEM_FAULT = frozenset({400, 413, 422, 500})  # statuses one input can cause (as in indexer.embed)
GAVE_UP = frozenset({None, 408, 429, 502, 503, 504})  # retries exhausted: those items fail, a rerun retries them

ROWS = pa.schema([
    pa.field("id", pa.string()), pa.field("modality", pa.string()), pa.field("source", pa.string()),
    pa.field("location", pa.string()),  # what the workers open: an absolute path or a URI
    pa.field("page", pa.int32()),  # PDF page number from 1
    pa.field("text", pa.string()),
])
EMBEDDED = pa.schema([*(ROWS.field(n) for n in ("id", "modality", "source", "page", "text")),
                      pa.field("embedding", pa.list_(pa.float32())), pa.field("error", pa.string()),
                      pa.field("tokens", pa.int64())])


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
            src = readable(location, fetched)
            image = render_pdf_page(src, page - 1, max_side) if page is not None else load_image(src, max_side)
            pngs.append(png_bytes(image))
            errors.append(None)
        except Exception as e:
            pngs.append(None)
            errors.append(f"cannot read: {type(e).__name__}: {e}")
    return batch.append_column("png", pa.array(pngs, pa.binary())).append_column("error", pa.array(errors, pa.string()))


class _Columns:
    """One prepared batch: its text, png and modality columns in; vectors, errors (the preparation's to start with)
    and token counts out, one slot per row, as `table()`."""

    def __init__(self, batch: pa.Table):
        self.batch, n = batch, batch.num_rows
        self.texts, self.pngs, self.modalities = (batch.column(c).to_pylist() for c in ("text", "png", "modality"))
        self.errors = batch.column("error").to_pylist()
        self.vectors: list = [None] * n
        self.tokens = [0] * n

    def table(self) -> pa.Table:
        columns = [self.batch.column(n) for n in ("id", "modality", "source", "page", "text")]
        vectors = pa.array([None if v is None else np.asarray(v, np.float32) for v in self.vectors],
                           pa.list_(pa.float32()))
        return pa.Table.from_arrays([*columns, vectors, pa.array(self.errors, pa.string()),
                                     pa.array(self.tokens, pa.int64())], schema=EMBEDDED)


class ModelEmbedder:
    """An actor holding `model.Embedder`: passages, truncated at the end to the server's token limits."""

    def __init__(self, checkpoint: str, dtype: str | None, max_tokens_text: int, max_tokens_image: int):
        from model import Embedder

        self.embedder = Embedder.from_pretrained(checkpoint, dtype=dtype)
        self.max_tokens = {"text": max_tokens_text, "image": max_tokens_image}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        from model import EmbedInput

        c = _Columns(batch)
        for modality in ("text", "image"):
            members = [i for i in range(batch.num_rows) if c.errors[i] is None and c.modalities[i] == modality]
            if not members:
                continue
            inputs = [EmbedInput(text=c.texts[i], image=Image.open(io.BytesIO(c.pngs[i])) if c.pngs[i] else None,
                                 input_type="passage") for i in members]
            for i, out in zip(members, self._embed(inputs)):
                if isinstance(out, Exception):
                    c.errors[i] = f"{type(out).__name__}: {out}"
                else:
                    c.vectors[i] = out
        return c.table()

    def _embed(self, inputs: list) -> list:
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

        c = _Columns(batch)
        members = [i for i in range(batch.num_rows) if c.errors[i] is None]
        payloads = {i: c.texts[i] if c.modalities[i] == "text" else
                    "data:image/png;base64," + base64.b64encode(c.pngs[i]).decode("ascii") for i in members}
        self.loop.run_until_complete(self._send(members, payloads, c.modalities, c.vectors, c.errors, c.tokens))
        return c.table()

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
