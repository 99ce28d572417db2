"""`python -m indexer search`: embed a query with the server, rank the index by cosine similarity (numpy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from indexer.client import ServerPool
from indexer.store import read_index


def top_k(matrix: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, cosine) of the k rows most similar to the query, best first."""
    if len(matrix) == 0:
        return []
    if matrix.shape[1] != query.shape[0]:
        raise ValueError(f"the index holds {matrix.shape[1]}-d vectors, the query is {query.shape[0]}-d")
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(query)
    scores = (matrix @ query) / np.maximum(norms, 1e-12)
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.lexsort((best, -scores[best]))]  # by score, then by row for ties: deterministic
    return [(int(i), float(scores[i])) for i in best]


async def search(index: str | Path, query: str, *, servers: Sequence[str], k: int = 5, model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The k best matches: [{"rank", "score", "id", "modality", "source"}]."""
    ids, matrix, table = read_index(index)
    async with ServerPool(servers, concurrency=1, timeout_s=timeout_s, api_key=api_key) as pool:
        model = model or await pool.model_id()
        vectors, _ = await pool.embed([query], model=model, input_type="query", modality=["text"])
    columns = {name: table.column(name).to_pylist() for name in ("modality", "source") if name in table.column_names}
    return [{"rank": rank, "score": score, "id": ids[row], **{name: col[row] for name, col in columns.items()}}
            for rank, (row, score) in enumerate(top_k(matrix, vectors[0], k), start=1)]
