"""The index as a LanceDB table: a sink for the indexers, an ANN index once it is large enough, and its search.

    corpus.lancedb/pages.lance        one row per item:
        id, modality, source, page (PDF page number from 1, else null), text (texts, else null),
        vector fixed_size_list<float32>[D]  (L2-normalised, as the server answers)
        vector_int8 [D] int8, vector_binary [D/8] uint8  (optional: the server's `embedding_type` int8 / ubinary)

Rows are appended a chunk at a time; each append is one LanceDB commit, so a crash loses at most the chunk being
filled and a rerun skips the ids already in the table. The table's schema metadata names the model.

ANN index: IVF_PQ with cosine distance, built by `build_index` only when the table holds at least
`DEFAULT_INDEX_MIN_ROWS` rows. Below that LanceDB's exhaustive scan is exact and fast (100,000 2048-d float32
vectors are 800 MB scanned in well under a second on one core), an index would only lose recall, and product
quantisation cannot train on fewer than 256 rows at all (`MIN_TRAINABLE_ROWS`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

DEFAULT_TABLE = "pages"
DEFAULT_INDEX_MIN_ROWS = 100_000
MIN_TRAINABLE_ROWS = 256  # PQ learns 256 centroids per sub-vector
VECTOR = "vector"
VECTOR_INT8 = "vector_int8"
VECTOR_BINARY = "vector_binary"
RESULT_COLUMNS = ("id", "modality", "source", "page", "text")


def is_lance_uri(path: str) -> bool:
    """A LanceDB database: a `.lancedb` / `.lance` name, or an existing directory holding `*.lance` tables."""
    import os

    text = str(path).rstrip("/")
    if text.endswith((".lancedb", ".lance")):
        return True
    return os.path.isdir(text) and any(name.endswith(".lance") for name in os.listdir(text))


def schema(dimensions: int, *, int8: bool = False, binary: bool = False,
           metadata: dict[str, str] | None = None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("page", pa.int32()),
        pa.field("text", pa.string()),
        pa.field(VECTOR, pa.list_(pa.float32(), dimensions), nullable=False),
    ]
    if int8:
        fields.append(pa.field(VECTOR_INT8, pa.list_(pa.int8(), dimensions)))
    if binary:
        fields.append(pa.field(VECTOR_BINARY, pa.list_(pa.uint8(), math.ceil(dimensions / 8))))
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})


def _fixed(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=value_type), matrix.shape[1])


def quantize(vectors: np.ndarray, embedding_type: str) -> np.ndarray:
    """The server's own int8 / ubinary forms (serving.encoding), so stored and served forms agree."""
    from serving.encoding import convert

    return convert(vectors, embedding_type)


class LanceSink:
    """Append-only writer of one LanceDB table, in chunks; `ids()` is what a resumed run skips."""

    def __init__(self, uri: str, table: str = DEFAULT_TABLE, *, chunk_size: int = 1024, int8: bool = False,
                 binary: bool = False, metadata: dict[str, str] | None = None):
        import lancedb

        self.uri, self.table_name, self.chunk_size = str(uri), table, chunk_size
        self.int8, self.binary, self.metadata = int8, binary, dict(metadata or {})
        self.db = lancedb.connect(self.uri)
        self.table = _open(self.db, table)
        if self.table is not None:  # an existing table decides which forms are stored
            names = self.table.schema.names
            self.int8, self.binary = VECTOR_INT8 in names, VECTOR_BINARY in names
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.parts_written = 0  # appends (commits) made

    def ids(self) -> set[str]:
        if self.table is None:
            return set()
        rows = self.table.search().select(["id"]).limit(self.table.count_rows() or 1).to_arrow()
        return set(rows.column("id").to_pylist())

    def add(self, ids: Sequence[str], modalities: Sequence[str], vectors: np.ndarray, sources: Sequence[str],
            pages: Sequence[int | None] | None = None, texts: Sequence[str | None] | None = None) -> None:
        n = len(ids)
        if n == 0:
            return
        vectors = np.asarray(vectors, np.float32)
        columns: dict[str, Any] = {
            "id": pa.array(ids, pa.string()), "modality": pa.array(modalities, pa.string()),
            "source": pa.array(sources, pa.string()),
            "page": pa.array(list(pages) if pages is not None else [None] * n, pa.int32()),
            "text": pa.array(list(texts) if texts is not None else [None] * n, pa.string()),
            VECTOR: _fixed(vectors, pa.float32()),
        }
        if self.int8:
            columns[VECTOR_INT8] = _fixed(quantize(vectors, "int8"), pa.int8())
        if self.binary:
            columns[VECTOR_BINARY] = _fixed(quantize(vectors, "ubinary"), pa.uint8())
        target = schema(vectors.shape[1], int8=self.int8, binary=self.binary, metadata=self.metadata)
        self._pending.append(pa.Table.from_pydict(columns, schema=target))
        self._pending_rows += n
        if self._pending_rows >= self.chunk_size:  # whole chunks now, the rest waits for more rows
            data = pa.concat_tables(self._pending)
            whole = data.num_rows - data.num_rows % self.chunk_size
            for start in range(0, whole, self.chunk_size):
                self._commit(data.slice(start, self.chunk_size))
            self._pending = [data.slice(whole)] if whole < data.num_rows else []
            self._pending_rows = data.num_rows - whole

    def flush(self) -> None:
        if self._pending:
            data = pa.concat_tables(self._pending)
            self._pending, self._pending_rows = [], 0
            self._commit(data)

    def _commit(self, data: pa.Table) -> None:
        if self.table is None:
            self.table = self.db.create_table(self.table_name, data=data, schema=data.schema)
        else:
            dims = self.table.schema.field(VECTOR).type.list_size
            if dims != data.schema.field(VECTOR).type.list_size:
                raise ValueError(f"table {self.table_name} holds {dims}-d vectors, these are "
                                 f"{data.schema.field(VECTOR).type.list_size}-d")
            self.table.add(data.select(self.table.schema.names))
        self.parts_written += 1

    def count(self) -> int:
        return 0 if self.table is None else self.table.count_rows()


def build_index(table, *, min_rows: int = DEFAULT_INDEX_MIN_ROWS, replace: bool = True) -> dict[str, Any] | None:
    """An IVF_PQ cosine index on `vector` when the table holds at least `min_rows` rows (never fewer than 256);
    None when it is too small. Partitions: about sqrt(rows); sub-vectors: D/16 (8-bit codes), or the largest
    divisor of D up to that."""
    rows = table.count_rows()
    if rows < max(min_rows, MIN_TRAINABLE_ROWS):
        return None
    dims = table.schema.field(VECTOR).type.list_size
    partitions = max(1, min(int(math.sqrt(rows)), rows // MIN_TRAINABLE_ROWS))
    target = max(1, dims // 16)
    sub_vectors = max(d for d in range(1, target + 1) if dims % d == 0)
    from lancedb.index import IvfPq

    table.create_index(VECTOR, config=IvfPq(distance_type="cosine", num_partitions=partitions,
                                            num_sub_vectors=sub_vectors), replace=replace)
    return {"type": "IVF_PQ", "metric": "cosine", "rows": rows, "partitions": partitions, "sub_vectors": sub_vectors}


def _open(db, table: str):
    """The table, or None when the database has no such table."""
    try:
        return db.open_table(table)
    except ValueError:  # LanceDB's "Table '...' was not found"
        return None


def open_table(uri: str, table: str = DEFAULT_TABLE):
    import lancedb

    found = _open(lancedb.connect(str(uri)), table)
    if found is None:
        raise FileNotFoundError(f"{uri}: no table {table!r}")
    return found


def model_of(table) -> str | None:
    value = (table.schema.metadata or {}).get(b"indexer.model")
    return value.decode() if value is not None else None


def search_vector(table, query: np.ndarray, k: int = 5, *, nprobes: int = 20,
                  refine_factor: int | None = 10) -> list[dict[str, Any]]:
    """The k rows nearest the query by cosine: [{"rank", "score" (cosine similarity), "id", "modality", "source",
    "page", "text"}]. With an ANN index, `nprobes` partitions are searched and `refine_factor * k` candidates are
    re-ranked on the full vectors; without one the scan is exact."""
    query = np.asarray(query, np.float32).reshape(-1)
    dims = table.schema.field(VECTOR).type.list_size
    if query.shape[0] != dims:
        raise ValueError(f"the table holds {dims}-d vectors, the query is {query.shape[0]}-d")
    q = table.search(query, vector_column_name=VECTOR).distance_type("cosine").limit(k)
    q = q.select([*RESULT_COLUMNS, "_distance"]).nprobes(nprobes)
    if refine_factor:
        q = q.refine_factor(refine_factor)
    hits = q.to_arrow().to_pylist()
    # Ties broken by id: the same results every time.
    hits.sort(key=lambda h: (h["_distance"], h["id"]))
    return [{"rank": rank, "score": 1.0 - float(h["_distance"]), **{c: h[c] for c in RESULT_COLUMNS}}
            for rank, h in enumerate(hits, start=1)]
