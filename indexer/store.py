"""The index on disk: a directory of Parquet part files, one per chunk, each written whole or not at all.

    out.parquet/part-00001.parquet, part-00002.parquet, ...   columns: id, modality, embedding list<float32>, source

A chunk is written to a hidden temporary file and renamed into place, so a crash loses at most the chunk being
filled, and readers (pyarrow, pandas, DuckDB, Spark all read the directory as one table) never see a partial
file. On restart the ids already stored are skipped. `pyarrow.parquet.read_table("out.parquet")` reads it all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    pa.field("source", pa.string(), nullable=False),
])
PART = re.compile(r"^part-(\d+)\.parquet$")


class PartStore:
    def __init__(self, path: str | Path, *, chunk_size: int = 1024, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not an index directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".part-*.tmp"):  # a chunk that a crash interrupted
            stale.unlink()
        self.chunk_size = chunk_size
        self.metadata = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        self._rows: list[tuple[str, str, np.ndarray, str]] = []
        self._next = max((int(m.group(1)) for p in self.path.iterdir() if (m := PART.match(p.name))), default=0) + 1
        self.parts_written = 0

    def parts(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if PART.match(p.name))

    def recorded(self, key: str) -> str | None:
        """A metadata value that the first part of the index was written with (None for a new index)."""
        parts = self.parts()
        if not parts:
            return None
        value = (pq.read_schema(parts[0]).metadata or {}).get(key.encode())
        return value.decode() if value is not None else None

    def set_metadata(self, key: str, value: str) -> None:
        """Written into the parts from now on."""
        self.metadata[key.encode()] = value.encode()

    def ids(self) -> set[str]:
        """Every id already stored."""
        done: set[str] = set()
        for part in self.parts():
            done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        return done

    def add(self, ids: Sequence[str], modalities: Sequence[str], vectors: np.ndarray, sources: Sequence[str]) -> None:
        self._rows.extend(zip(ids, modalities, vectors, sources))
        while len(self._rows) >= self.chunk_size:
            self._write(self._rows[: self.chunk_size])
            del self._rows[: self.chunk_size]

    def flush(self) -> None:
        if self._rows:
            self._write(self._rows)
            self._rows = []

    def _write(self, rows: list[tuple[str, str, np.ndarray, str]]) -> None:
        ids, modalities, vectors, sources = zip(*rows)
        matrix = np.stack(vectors).astype(np.float32, copy=False)
        n, dim = matrix.shape
        embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
                                             pa.array(matrix.reshape(-1)))
        table = pa.Table.from_arrays(
            [pa.array(ids, pa.string()), pa.array(modalities, pa.string()), embedding, pa.array(sources, pa.string())],
            schema=SCHEMA.with_metadata(self.metadata))
        name = f"part-{self._next:05d}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:  # on disk before it is renamed into place
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        self._next += 1
        self.parts_written += 1


def read_index(path: str | Path) -> tuple[list[str], np.ndarray, pa.Table]:
    """(ids, float32 [n, D] embeddings, the table without the embedding column) of an index (directory or file)."""
    table = pq.read_table(path)
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32), table.drop_columns(["embedding"])
    column = table.column("embedding").combine_chunks()
    dims = set(column.value_lengths().unique().to_pylist())
    if len(dims) != 1:
        raise ValueError(f"{path}: embeddings of different sizes {sorted(dims)}")
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, dims.pop())
    return table.column("id").to_pylist(), matrix.astype(np.float32, copy=False), table.drop_columns(["embedding"])
