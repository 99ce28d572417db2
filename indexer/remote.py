"""Inputs under URIs that `pyarrow.fs` reads (`s3://`, `gs://`, `hdfs://`, `file://`), for `python -m indexer ray`.

The same kinds of files as in a local directory (`indexer.sources`), the same id rules relative to the URI given:
`dir/page.png`, `report.pdf#page=3`; JSONL/Parquet texts are read with the local reader's rules. Workers open
each file by its URI, so every node of a cluster reads the corpus where it lies.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Iterator

from indexer.sources import IMAGE_SUFFIXES, PDF_SUFFIXES, TEXT_SUFFIXES, Item, SourceError, discover, pdf_page_count


def is_uri(value: str | Path) -> bool:
    return "://" in str(value)


def uri_items(uri: str, *, id_field: str, text_field: str, on_error, scratch: Path) -> Iterator[Item]:
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


def readable(location: str, fetched: dict[str, bytes]):
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
