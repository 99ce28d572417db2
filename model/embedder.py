"""`Embedder`: the model as a Python API, without any server.

    from model import Embedder
    e = Embedder.from_pretrained("nvidia/llama-nemotron-embed-vl-1b-v2", dtype="float32")
    vectors = e.embed([{"text": "what is a b-tree?", "image": None, "input_type": "query"}])
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from model import fp8
from model.batching import PreparedInput, collate, round_up
from model.config import ModelConfig
from model.network import Batch, make_forward
from model.tiling import num_tiles, tile_image
from model.tokenization import Prompter, Truncate
from model.weights import load_network

# dtype -> compute dtype. "fp8": the linear layers of the vision tower and the decoder multiply in e4m3 (model/fp8.py),
# everything else computes in bfloat16.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp8": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EmbedInput:
    text: str | None = None
    image: Image.Image | None = None
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
        self.max_tiles = max_tiles or self.config.max_dynamic_patch
        self.prompter = Prompter.from_dir(self.path, self.config)
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

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, dtype: str | None = None, revision: str | None = None,
                        **kwargs) -> Embedder:
        """A converted directory, a Hugging Face layout directory (converted on the fly and cached) or a Hub id."""
        from conversion.resolve import resolve

        return cls(resolve(path_or_repo_id, revision=revision), dtype=dtype, **kwargs)

    # ---- host side -------------------------------------------------------------------------------------------
    def num_tiles(self, width: int, height: int) -> int:
        cfg = self.config
        return num_tiles(width, height, cfg.force_image_size, self.max_tiles, cfg.use_thumbnail)

    @property
    def num_tiles_max(self) -> int:
        """The most tiles one image can become (the grid plus its thumbnail)."""
        return self.max_tiles + (1 if self.config.use_thumbnail and self.max_tiles > 1 else 0)

    def tiles(self, image: Image.Image) -> np.ndarray:
        cfg = self.config
        return tile_image(image, cfg.force_image_size, self.max_tiles, cfg.use_thumbnail)

    def prepare(self, item: EmbedInput | Mapping[str, Any], truncate: Truncate | str = Truncate.NONE,
                max_tokens: int | None = None) -> PreparedInput:
        """Tile and tokenise one input. Raises InputTooLongError / ValueError for an input that cannot be embedded."""
        item = EmbedInput.of(item)
        if item.image is None and not item.text:
            raise ValueError("an input needs text, an image or both")
        tiles = self.tiles(item.image) if item.image is not None else None
        ids = self.prompter.encode(item.text, 0 if tiles is None else len(tiles), item.input_type, truncate,
                                   max_tokens)
        return PreparedInput(ids, tiles)

    def prepare_texts(self, texts: Sequence[str], input_types: Sequence[str], truncates: Sequence[Truncate | str],
                      max_tokens: Sequence[int | None]) -> list[PreparedInput | Exception]:
        """`prepare` for many text-only inputs, tokenised in one tokenizer call; a failure sits in its own slot."""
        encoded = self.prompter.encode_batch(texts, input_types, truncates, max_tokens)
        return [ids if isinstance(ids, Exception) else PreparedInput(ids) for ids in encoded]

    def prepared_from_ids(self, token_ids, image: Image.Image | None) -> PreparedInput:
        """An input tokenised elsewhere (by `prompter.encode`): checks the ids and that its image block fits."""
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            ids = np.asarray([-1])
        if ids.ndim != 1 or not len(ids):
            raise ValueError("token_ids must be a non-empty list of integers")
        if ids.min() < 0 or ids.max() >= self.config.text.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {self.config.text.vocab_size})")
        ids = ids.astype(np.int32)
        tiles = self.tiles(image) if image is not None else None
        special = self.prompter.special
        starts = np.flatnonzero(ids == special.img_start)
        if tiles is not None:
            block = len(tiles) * self.config.tokens_per_tile
            at = int(starts[0]) + 1 if len(starts) else -1
            if at < 0 or at + block > len(ids) or not np.all(ids[at:at + block] == special.img_context):
                raise ValueError(f"the prompt has no block of {block} image tokens for this image's "
                                 f"{len(tiles)} tiles")
        return PreparedInput(ids, tiles)

    # ---- device side -----------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> np.ndarray:
        """One padded batch -> float32 embeddings [rows, D] (padded rows included)."""
        return np.asarray(self._forward(self.state, batch))

    def collate(self, inputs: list[PreparedInput], *, length: int, rows: int, tiles: int) -> Batch:
        return collate(inputs, length=length, rows=rows, tiles=tiles, img_start_id=self.prompter.special.img_start,
                       img_context_id=self.prompter.special.img_context,
                       tokens_per_tile=self.config.tokens_per_tile)

    def embed_prepared(self, inputs: list[PreparedInput], max_batch_tokens: int = 16384) -> np.ndarray:
        """Embed prepared inputs: sorted by length, packed under a padded-token budget, restored to input order."""
        out = np.zeros((len(inputs), self.config.embedding_size), np.float32)
        order = sorted(range(len(inputs)), key=lambda i: inputs[i].num_tokens)
        group: list[int] = []

        def flush() -> None:
            members = [inputs[i] for i in group]
            length = round_up(max(p.num_tokens for p in members), 32)
            rows = 1 << (len(members) - 1).bit_length()
            tiles = sum(p.num_tiles for p in members)
            batch = self.collate(members, length=length, rows=rows, tiles=1 << max(tiles - 1, 0).bit_length())
            out[group] = self.forward(batch)[: len(members)]

        for i in order:
            longest = max(round_up(inputs[i].num_tokens, 32), 32)
            if group and (len(group) + 1) * longest > max_batch_tokens:
                flush()
                group = []
            group.append(i)
        if group:
            flush()
        return out

    def embed(self, items: Iterable[EmbedInput | Mapping[str, Any]], truncate: Truncate | str = Truncate.NONE,
              max_tokens: int | None = None) -> np.ndarray:
        """L2-normalised float32 embeddings [n, D], in input order; raises for the first input that cannot be
        embedded. Text inputs are tokenised in one tokenizer call."""
        items = [EmbedInput.of(item) for item in items]
        texts = [i for i, item in enumerate(items) if item.image is None and item.text]
        batched = dict(zip(texts, self.prepare_texts(
            [items[i].text for i in texts], [items[i].input_type for i in texts], [truncate] * len(texts),
            [max_tokens] * len(texts))))
        prepared = []
        for i, item in enumerate(items):
            done = batched.get(i)
            if isinstance(done, Exception):
                raise done
            prepared.append(done if done is not None else self.prepare(item, truncate, max_tokens))
        if not prepared:
            return np.zeros((0, self.config.embedding_size), np.float32)
        return self.embed_prepared(prepared)
