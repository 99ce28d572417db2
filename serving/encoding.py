"""From float vectors to what the client asked for: `dimensions`, `embedding_type` and `encoding_format`.

    float    the vector (float32)                    base64: little-endian float32 bytes
    int8     round(clip(v, -1, 1) * 127)             base64: one byte per value
    uint8    int8 + 128
    ubinary  1 bit per component (v > 0), packed MSB first: D/8 bytes as 0..255
    binary   the same bytes - 128, as -128..127
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from serving.errors import BadRequestError
from serving.schemas import EmbeddingRequest

# Matryoshka sizes of the published 2048-d model. Another embedding size scales them (D/16 … D): a tiny test
# checkpoint with D = 64 serves 4, 8, …, 64, and any value above D is refused.
REFERENCE_SIZE = 2048
REFERENCE_DIMENSIONS = (128, 256, 384, 512, 768, 1024, 1536, 2048)


def allowed_dimensions(embedding_size: int) -> tuple[int, ...]:
    if embedding_size == REFERENCE_SIZE:
        return REFERENCE_DIMENSIONS
    return tuple(sorted({max(1, d * embedding_size // REFERENCE_SIZE) for d in REFERENCE_DIMENSIONS}))


def check_dimensions(dimensions: int | None, embedding_type: str, embedding_size: int) -> None:
    if dimensions is None:
        return
    allowed = allowed_dimensions(embedding_size)
    if dimensions not in allowed:
        raise BadRequestError(f"dimensions must be one of {', '.join(map(str, allowed))}; got {dimensions}")
    if embedding_type != "float":
        raise BadRequestError(f"dimensions is supported only with embedding_type 'float'; got '{embedding_type}'")


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first `dimensions` components and L2-renormalise (Matryoshka)."""
    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    head = vectors[..., :dimensions]
    return head / np.maximum(np.linalg.norm(head, axis=-1, keepdims=True), 1e-12)


def convert(vectors: np.ndarray, embedding_type: str) -> np.ndarray:
    """float32 [n, D] -> [n, D] float32 / int8 / uint8, or [n, D/8] uint8 / int8 for the binary types."""
    if embedding_type == "float":
        return vectors.astype(np.float32, copy=False)
    if embedding_type in ("int8", "uint8"):
        q = np.rint(np.clip(vectors, -1.0, 1.0) * 127.0).astype(np.int16)
        return q.astype(np.int8) if embedding_type == "int8" else (q + 128).astype(np.uint8)
    packed = np.packbits(vectors > 0, axis=-1)  # MSB first, zero-padded to whole bytes
    if embedding_type == "ubinary":
        return packed
    if embedding_type == "binary":
        return (packed.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"unknown embedding_type {embedding_type!r}")


def encode(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """One converted vector -> itself (orjson writes numpy arrays as JSON lists), or base64 of its little-endian
    bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")
    return vector


# The element type of each embedding_type, as `convert` makes it (and as base64 carries it, little-endian).
DTYPES = {"float": "<f4", "int8": "i1", "uint8": "u1", "binary": "i1", "ubinary": "u1"}


def decode(embedding: list | str, embedding_type: str) -> np.ndarray:
    """A client's side of `encode`: one answer's `embedding` (a JSON list, or base64) -> its values."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), DTYPES[embedding_type])
    return np.asarray(embedding, DTYPES[embedding_type])


def embeddings_json(vectors: np.ndarray, request: EmbeddingRequest, model: str, tokens: int) -> bytes:
    """The /v1/embeddings response body, written by orjson straight from numpy (float32 as the shortest decimal that
    reads back as the same float32: exact, and half the bytes of Python's 17-digit doubles)."""
    return orjson.dumps(embeddings_body(vectors, request, model, tokens), option=orjson.OPT_SERIALIZE_NUMPY)


def embeddings_body(vectors: np.ndarray, request: EmbeddingRequest, model: str, tokens: int) -> dict[str, Any]:
    """The /v1/embeddings response: `data` in input order, usage counting every token (image tokens included)."""
    converted = convert(shorten(vectors, request.dimensions), request.embedding_type)
    encoding_format = request.encoding_format or "float"
    data = [{"object": "embedding", "index": i, "embedding": encode(v, encoding_format)}
            for i, v in enumerate(converted)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
