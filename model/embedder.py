"""`Embedder`: the model as a Python API, without any server.

    from model import Embedder
    e = Embedder.from_pretrained("nvidia/llama-nemotron-embed-vl-1b-v2", dtype="float32")
    vectors = e.embed([{"text": "what is a b-tree?", "image": None, "input_type": "query"}])

`embed` runs through the same engine (engine/: packing, buckets) and the same processor (model/processor.py) as the
server, so a vector from here equals the server's for the same input.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from model import fp8
from model.batching import PreparedInput, collate
from model.config import ModelConfig
from model.network import Batch, make_forward
from model.processor import ImageSource, Processor
from model.tokenization import Prompter, Truncate
from model.weights import load_network

# dtype -> compute dtype. "fp8": the linear layers of the vision tower and the decoder multiply in e4m3 (model/fp8.py),
# everything else computes in bfloat16.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp8": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EmbedInput:
    text: str | None = None
    image: Image.Image | bytes | None = None  # a PIL image or encoded bytes (PNG, JPEG, ...)
    input_type: str = "passage"

    @classmethod
    def of(cls, item: EmbedInput | Mapping[str, Any]) -> EmbedInput:
        if isinstance(item, EmbedInput):
            return item
        return cls(text=item.get("text"), image=item.get("image"), input_type=item.get("input_type", "passage"))


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class Embedder:
    def __init__(self, converted_dir: str | Path, *, dtype: str | None = None, max_tiles: int | None = None,
                 attention_implementation: str | None = None, fp8_recipe: fp8.Recipe | None = None):
        self.path = Path(converted_dir)
        self.config = ModelConfig.from_dir(self.path)
        self.dtype = dtype or default_dtype()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.dtype == "float32" and jax.default_backend() == "gpu":
            # float32 asked for means float32 products, not TensorFloat-32 (GPUs' default for float32 matmuls).
            jax.config.update("jax_default_matmul_precision", "highest")
        self.processor = Processor(self.config, Prompter.from_dir(self.path, self.config), max_tiles)
        self.max_tiles = self.processor.max_tiles
        self.compute_dtype = jnp.dtype(DTYPES[self.dtype]).name
        if self.dtype == "fp8":
            fp8.check_device()
            # Loaded in float32 so that each weight is rounded once, to e4m3, not to bfloat16 first.
            graphdef, state = load_network(self.path, self.config, dtype=DTYPES[self.dtype], param_dtype=jnp.float32,
                                           attention_implementation=attention_implementation)
            self.graphdef, self.state = fp8.quantize(graphdef, state, fp8_recipe or fp8.SERVING,
                                                     param_dtype=DTYPES[self.dtype])
            del graphdef, state
        else:
            self.graphdef, self.state = load_network(self.path, self.config, dtype=DTYPES[self.dtype],
                                                     attention_implementation=attention_implementation)
        self._forward = make_forward(self.graphdef)
        manifest = self.path / "manifest.json"
        self.manifest: dict[str, Any] = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self._engine = None
        self._engine_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, dtype: str | None = None, revision: str | None = None,
                        **kwargs) -> Embedder:
        """A converted directory, a Hugging Face layout directory (converted on the fly and cached) or a Hub id."""
        from conversion.resolve import resolve

        return cls(resolve(path_or_repo_id, revision=revision), dtype=dtype, **kwargs)

    # ---- host side: the processor, shared with the engine and the server ------------------------------------
    @property
    def prompter(self) -> Prompter:
        return self.processor.prompter

    def num_tiles(self, width: int, height: int) -> int:
        return self.processor.num_tiles(width, height)

    @property
    def num_tiles_max(self) -> int:
        """The most tiles one image can become (the grid plus its thumbnail)."""
        return self.processor.num_tiles_max

    def tiles(self, image: ImageSource) -> np.ndarray:
        return self.processor.tiles(image)

    def prepare(self, item: EmbedInput | Mapping[str, Any], truncate: Truncate | str = Truncate.NONE,
                max_tokens: int | None = None) -> PreparedInput:
        """Tile and tokenise one input. Raises InputTooLongError / ValueError for an input that cannot be embedded."""
        item = EmbedInput.of(item)
        return self.processor.prepare(item.text, item.image, item.input_type, truncate, max_tokens)

    def prepare_texts(self, texts: Sequence[str], input_types: Sequence[str], truncates: Sequence[Truncate | str],
                      max_tokens: Sequence[int | None]) -> list[PreparedInput | Exception]:
        return self.processor.prepare_texts(texts, input_types, truncates, max_tokens)

    def prepared_from_ids(self, token_ids, image: ImageSource | None) -> PreparedInput:
        return self.processor.prepared_from_ids(token_ids, image)

    # ---- device side -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> np.ndarray:
        """One padded batch -> float32 embeddings [rows, D] (padded rows included)."""
        return np.asarray(self._forward(self.state, batch))

    def collate(self, inputs: list[PreparedInput], *, length: int, rows: int, tiles: int) -> Batch:
        return collate(inputs, length=length, rows=rows, tiles=tiles, img_start_id=self.prompter.special.img_start,
                       img_context_id=self.prompter.special.img_context,
                       tokens_per_tile=self.config.tokens_per_tile)

    # ---- the Python API: the server's engine, in this process --------------------------------------------------
    @property
    def engine(self):
        """The engine that `embed` runs through (engine.Engine): the server's packer and bucket plan for this
        backend, created on first use and not warmed up, so a call compiles only the buckets its inputs need."""
        with self._engine_lock:
            if self._engine is None:
                from engine import Engine, EngineConfig  # the engine imports the model, never the reverse

                self._engine = Engine(self, EngineConfig.for_backend())
            return self._engine

    def embed(self, items: Iterable[EmbedInput | Mapping[str, Any]], truncate: Truncate | str = Truncate.NONE,
              max_tokens: int | None = None) -> np.ndarray:
        """L2-normalised float32 embeddings [n, D], in input order; raises for the first input that cannot be
        embedded (before any forward pass runs). An image may be a PIL image or encoded bytes: the same bytes give
        the same vector as the server."""
        from engine import EngineItem

        truncate = Truncate(truncate).value
        work = []
        for item in items:  # straight to the engine's items: one object per input, not two
            if isinstance(item, EmbedInput):
                text, image, input_type = item.text, item.image, item.input_type
            else:
                text, image, input_type = item.get("text"), item.get("image"), item.get("input_type", "passage")
            work.append(EngineItem(text=text, image=image, input_type=input_type, truncate=truncate,
                                   max_tokens=max_tokens))
        if not work:
            return np.zeros((0, self.config.embedding_size), np.float32)
        engine = self.engine
        prepared = engine.prepare_all(work)
        _raise_first(prepared)
        vectors = engine.run(prepared)
        _raise_first(vectors)
        return np.stack(vectors)

    def close(self) -> None:
        """Stop the engine's host threads, if `embed` started them."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


def _raise_first(results: Sequence[Any]) -> None:
    error = next((r for r in results if isinstance(r, Exception)), None)
    if error is not None:
        raise error
