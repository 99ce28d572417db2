"""Search any index with a text query embedded by a server or in this process.

The query is embedded as a query (`input_type=query`), the corpus was embedded as passages. A LanceDB database is
searched through LanceDB (its ANN index when it has one, else an exact scan); a Parquet index by NumPy
(`indexer.search.top_k`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def embed_query(query: str, *, servers: Sequence[str] = (), checkpoint: str | None = None, model: str | None = None,
                api_key: str | None = None, timeout_s: float = 60.0, dtype: str | None = None) -> np.ndarray:
    """The query's L2-normalised float32 vector: from `checkpoint` in process when given, else from the servers."""
    if checkpoint:
        from model import Embedder

        return Embedder.from_pretrained(checkpoint, dtype=dtype).embed([{"text": query, "input_type": "query"}],
                                                                       truncate="END")[0]
    from indexer.client import ServerPool

    async def ask() -> np.ndarray:
        async with ServerPool(servers, concurrency=1, timeout_s=timeout_s, api_key=api_key) as pool:
            name = model or await pool.model_id()
            vectors, _ = await pool.embed([query], model=name, input_type="query", modality=["text"])
            return vectors[0]

    return asyncio.run(ask())


def search_index(index: str | Path, query: str, *, k: int = 5, table: str = "pages", **embed: Any
                 ) -> list[dict[str, Any]]:
    """The k best matches, best first: [{"rank", "score" (cosine), "id", "modality", "source", ...}] (LanceDB
    results also carry "page" and "text"). `embed`: the keywords of `embed_query`."""
    from indexer.lance import is_lance_uri

    if is_lance_uri(str(index)):
        from indexer.lance import open_table, search_vector

        lance_table = open_table(str(index), table)  # before embedding: a wrong path fails fast
        return search_vector(lance_table, embed_query(query, **embed), k)
    from indexer.search import top_k
    from indexer.store import read_index

    ids, matrix, rest = read_index(index)
    vector = embed_query(query, **embed)
    columns = {name: rest.column(name).to_pylist() for name in ("modality", "source") if name in rest.column_names}
    return [{"rank": rank, "score": score, "id": ids[row], **{name: col[row] for name, col in columns.items()}}
            for rank, (row, score) in enumerate(top_k(matrix, vector, k), start=1)]
