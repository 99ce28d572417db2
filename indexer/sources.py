"""What to embed: images, PDF pages and texts, found in the inputs and turned into request payloads.

An input is a directory (its images and PDFs, recursively), an image or PDF file, or a JSONL / Parquet file of
texts. Ids: an image's path relative to the corpus root, a PDF page `path#page=N` (N from 1), a text's own `id`
field. The corpus root is `root` when given, else the deepest directory that holds every directory and image/PDF
input (the directory itself when there is one), so `a/report.pdf` and `b/report.pdf` keep distinct ids. A path is
readable in search results and stays the same across runs, which is what resuming needs; the indexer records the
root in the index so that later runs keep it (`corpus_root`). Two items with one id are a collision only when they
come from different places (another file, page or record); the same file given twice is a plain duplicate.
Images are sent as PNG data URLs, scaled down so that their long side is at most `max_side`; PDF pages are
rendered with pypdfium2 at exactly that long side.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
PDF_SUFFIXES = frozenset({".pdf"})
TEXT_SUFFIXES = frozenset({".jsonl", ".ndjson", ".parquet"})
# The real model tiles images into at most 6 tiles of 512 px (plus a thumbnail): a page's long side of 1536 px is
# what its largest grids use; more pixels only make requests bigger.
DEFAULT_MAX_SIDE = 1536

OnError = Callable[[str, str, str], None]  # (id, source, message)


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    modality: str  # "text" or "image": the NIM `modality` of the request
    source: str  # the file it came from
    text: str | None = None  # texts
    path: Path | None = None  # images and PDFs
    page: int | None = None  # PDF pages: 0-based index
    record: int | None = None  # texts: record number in their file, from 1

    @property
    def is_page(self) -> bool:
        return self.page is not None

    @property
    def origin(self) -> tuple[str, int | None, int | None]:
        """Where it comes from: two items with one id and different origins are an id collision."""
        return os.path.abspath(self.source), self.page, self.record

    def where(self) -> str:
        if self.page is not None:
            return f"{self.source} page {self.page + 1}"
        if self.record is not None:
            return f"{self.source} record {self.record}"
        return self.source


class SourceError(ValueError):
    pass


# ---- discovery ------------------------------------------------------------------------------------------------------
def _file_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The inputs whose items get path ids (directories, images, PDFs), absolute; texts carry their own ids."""
    found = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() or (path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES):
            found.append(Path(os.path.abspath(path)))
    return found


def corpus_root(inputs: Sequence[str | Path], root: str | Path | None = None,
                recorded: str | None = None) -> Path | None:
    """The directory that file ids are relative to: `root` if given, else the one recorded in an index being
    resumed, else the deepest directory holding every directory/image/PDF input (None when all are texts).
    Raises SourceError if an input lies outside it."""
    files = _file_inputs(inputs)
    if root is not None:
        chosen = Path(os.path.abspath(Path(root).expanduser()))
        origin = "--root"
    elif recorded:
        chosen, origin = Path(recorded), "the index (the root of its first run)"
    elif files:
        return Path(os.path.commonpath([p if p.is_dir() else p.parent for p in files]))
    else:
        return None
    for path in files:
        if not path.is_relative_to(chosen):
            raise SourceError(f"{path} is outside the corpus root {chosen}, recorded in {origin}: ids are paths "
                              f"relative to it. Give inputs under it, or a --root that holds them all (ids "
                              f"already in the index would then not match: use a new --output)")
    return chosen


def discover(inputs: Sequence[str | Path], *, id_field: str = "id", text_field: str = "text",
             on_error: OnError | None = None, root: str | Path | None = None) -> Iterator[Item]:
    """Every item of the inputs, in a stable order. Unreadable files and bad records go to `on_error`.
    File ids are paths relative to `root` (default: `corpus_root(inputs)`)."""
    on_error = on_error or _raise
    for raw in inputs:
        if not Path(raw).exists():
            raise SourceError(f"{raw}: no such file or directory")
    base = corpus_root(inputs, root)

    def rel_id(file: Path) -> str:
        return Path(os.path.relpath(os.path.abspath(file), base)).as_posix()

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            for file in files:
                suffix = file.suffix.lower()
                if suffix in IMAGE_SUFFIXES or suffix in PDF_SUFFIXES:
                    yield from _file_items(file, rel_id(file), on_error)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                yield from _text_items(path, id_field, text_field, on_error)
            elif suffix in IMAGE_SUFFIXES or suffix in PDF_SUFFIXES:
                yield from _file_items(path, rel_id(path), on_error)
            else:
                raise SourceError(f"{path}: not a directory, image, PDF, JSONL or Parquet file")
        else:
            raise SourceError(f"{path}: no such file or directory")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _raise(item_id: str, source: str, message: str) -> None:
    raise SourceError(f"{source}: {message}")


def _file_items(path: Path, rel_id: str, on_error: OnError) -> Iterator[Item]:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        yield Item(id=rel_id, modality="image", source=str(path), path=path)
        return
    try:
        pages = pdf_page_count(path)
    except Exception as e:  # corrupt or encrypted PDF: report it, go on with the rest
        on_error(rel_id, str(path), f"cannot open PDF: {e}")
        return
    for page in range(pages):
        yield Item(id=f"{rel_id}#page={page + 1}", modality="image", source=str(path), path=path, page=page)


def _text_items(path: Path, id_field: str, text_field: str, on_error: OnError) -> Iterator[Item]:
    for n, item_id, text, error in _records(path, id_field, text_field):
        if error:
            on_error(f"{path.name}:{n}", str(path), f"record {n}: {error}")
        elif item_id is None or str(item_id) == "":
            on_error(f"{path.name}:{n}", str(path), f"record {n} has no {id_field!r}")
        elif not isinstance(text, str) or not text.strip():
            on_error(str(item_id), str(path), f"record {n} has no {text_field!r} text")
        else:
            yield Item(id=str(item_id), modality="text", source=str(path), text=text, record=n)


def _records(path: Path, id_field: str, text_field: str) -> Iterator[tuple[int, object, object, str | None]]:
    """(record number from 1, id, text, error) for each record of a JSONL or Parquet file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[id_field, text_field], batch_size=4096):
            for item_id, text in zip(batch.column(id_field).to_pylist(), batch.column(text_field).to_pylist()):
                n += 1
                yield n, item_id, text, None
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, None, f"invalid JSON: {e}"
                continue
            if not isinstance(record, dict):
                yield n, None, None, "not a JSON object"
                continue
            yield n, record.get(id_field), record.get(text_field), None


# ---- payloads -------------------------------------------------------------------------------------------------------
_pdfium_lock = threading.Lock()  # pdfium is not thread-safe: one call at a time, from any thread
_open_pdfs: OrderedDict[Path, object] = OrderedDict()  # the last few documents, so pages don't reparse the file
_MAX_OPEN_PDFS = 4


def _pdf(path: Path):
    """An open document (call with the lock held)."""
    import pypdfium2 as pdfium

    doc = _open_pdfs.pop(path, None) or pdfium.PdfDocument(path)
    _open_pdfs[path] = doc
    while len(_open_pdfs) > _MAX_OPEN_PDFS:
        _open_pdfs.popitem(last=False)[1].close()
    return doc


def close_pdfs() -> None:
    with _pdfium_lock:
        while _open_pdfs:
            _open_pdfs.popitem()[1].close()


def pdf_page_count(path: Path) -> int:
    import pypdfium2 as pdfium

    with _pdfium_lock:
        doc = pdfium.PdfDocument(path)  # not cached: discovery sees every PDF once, long before rendering
        try:
            return len(doc)
        finally:
            doc.close()


def render_pdf_page(path: Path, page: int, max_side: int):
    """The page as a PIL image whose long side is `max_side` pixels."""
    with _pdfium_lock:
        pdf_page = _pdf(path)[page]
        try:
            width, height = pdf_page.get_size()  # points
            bitmap = pdf_page.render(scale=max_side / max(width, height, 1e-6))
            image = bitmap.to_pil().convert("RGB")  # a copy: it outlives the bitmap
            bitmap.close()
            return image
        finally:
            pdf_page.close()


def load_image(path: Path, max_side: int):
    """RGB, scaled down (never up) so that the long side is at most `max_side`; transparency over white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = im.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    return image


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)  # level 3: smaller and faster than the default here
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def payload(item: Item, max_side: int = DEFAULT_MAX_SIDE) -> str:
    """The request input for one item: its text, or its image as a PNG data URL."""
    if item.modality == "text":
        assert item.text is not None
        return item.text
    assert item.path is not None
    if item.is_page:
        return png_data_url(render_pdf_page(item.path, item.page, max_side))
    return png_data_url(load_image(item.path, max_side))
