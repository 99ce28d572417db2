"""Bulk indexing with an embedding server that speaks NVIDIA NIM's API (this repository's service, or a NIM).

    python -m indexer embed DOCS/ texts.jsonl --output index.parquet --server http://localhost:3000
    python -m indexer search --index index.parquet --server http://localhost:3000 "query text" -k 5

Modules: sources (what to embed: images, PDF pages, texts), client (servers, retries), store (resumable Parquet),
embed (the pipeline and its report), search (cosine top-k). With the `indexer` extra: ray_pipeline (the same on
Ray Data, `python -m indexer ray`), lance (a LanceDB table as the index), query (search either kind of index).
See docs/indexing.md.
"""

from indexer.client import HostNotFound, RequestFailed, ServerPool
from indexer.embed import EmbedOptions, Report, run_embed
from indexer.search import search
from indexer.sources import Item, corpus_root, discover
from indexer.store import PartStore, read_index

__all__ = ["EmbedOptions", "HostNotFound", "Item", "PartStore", "Report", "RequestFailed", "ServerPool", "corpus_root",
           "discover", "read_index", "run_embed", "search"]
