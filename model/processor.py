"""The one processor: what the model is given for an input, whichever door it came in by.

Text and an image (encoded bytes or a PIL image) become a `PreparedInput`: the image decoded and converted to RGB
exactly as the reference processor does, tiled, and the prompt tokenised and truncated. The Python API (`Embedder`),
the engine and, through the engine, the server all call this; so the same bytes give the same pixels everywhere.

What an input is allowed to be (formats, sizes, pixel counts) is the caller's policy: the server checks it at its
edge and passes the formats it accepts; the Python API accepts whatever Pillow decodes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from model.batching import PreparedInput
from model.config import ModelConfig
from model.tiling import num_tiles, tile_image, to_rgb
from model.tokenization import Prompter, Truncate

ImageSource = bytes | bytearray | memoryview | Image.Image


def load_image(source: ImageSource, formats: Sequence[str] | None = None) -> Image.Image:
    """Encoded bytes or a PIL image -> RGB pixels, as `to_rgb` gives them. An animation gives its first frame (a PIL
    image gives the frame it is on). `formats`: the Pillow formats the bytes may be (None: any Pillow decodes).
    Raises what Pillow raises for data it cannot decode (UnidentifiedImageError, OSError, DecompressionBombError)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(source), formats=None if formats is None else list(formats)) as decoded:
            decoded.load()  # the first frame of an animation
            return to_rgb(decoded)
    raise TypeError(f"an image must be encoded bytes or a PIL image; got {type(source).__name__}")


class Processor:
    """Decoding, RGB conversion, tiling, prompts, tokenisation and truncation for one checkpoint. Thread-safe."""

    def __init__(self, config: ModelConfig, prompter: Prompter, max_tiles: int | None = None):
        self.config = config
        self.prompter = prompter
        self.max_tiles = max_tiles or config.max_dynamic_patch

    @classmethod
    def from_dir(cls, path: str | Path, config: ModelConfig | None = None, max_tiles: int | None = None) -> Processor:
        """The processor of a converted (or Hugging Face layout) checkpoint directory: its config and tokenizer."""
        config = config or ModelConfig.from_dir(path)
        return cls(config, Prompter.from_dir(path, config), max_tiles)

    # ---- images ----------------------------------------------------------------------------------------------
    def num_tiles(self, width: int, height: int) -> int:
        """Tiles an image of this size becomes (from its header alone, before any pixel is decoded)."""
        cfg = self.config
        return num_tiles(width, height, cfg.force_image_size, self.max_tiles, cfg.use_thumbnail)

    @property
    def num_tiles_max(self) -> int:
        """The most tiles one image can become (the grid plus its thumbnail)."""
        return self.max_tiles + (1 if self.config.use_thumbnail and self.max_tiles > 1 else 0)

    def tiles(self, image: ImageSource, formats: Sequence[str] | None = None) -> np.ndarray:
        """uint8 [n, S, S, 3]: the image's tiles, thumbnail last."""
        cfg = self.config
        return tile_image(load_image(image, formats), cfg.force_image_size, self.max_tiles, cfg.use_thumbnail)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def prepare(self, text: str | None, image: ImageSource | None, input_type: str = "passage",
                truncate: Truncate | str = Truncate.NONE, max_tokens: int | None = None, *,
                image_formats: Sequence[str] | None = None) -> PreparedInput:
        """Tile and tokenise one input. Raises InputTooLongError / ValueError for an input that cannot be embedded,
        and Pillow's errors for image data it cannot decode."""
        if image is None and not text:
            raise ValueError("an input needs text, an image or both")
        tiles = self.tiles(image, image_formats) if image is not None else None
        ids = self.prompter.encode(text, 0 if tiles is None else len(tiles), input_type, truncate, max_tokens)
        return PreparedInput(ids, tiles)

    def prepare_texts(self, texts: Sequence[str], input_types: Sequence[str], truncates: Sequence[Truncate | str],
                      max_tokens: Sequence[int | None]) -> list[PreparedInput | Exception]:
        """`prepare` for many text-only inputs, tokenised in one tokenizer call; a failure sits in its own slot."""
        encoded = self.prompter.encode_batch(texts, input_types, truncates, max_tokens)
        return [ids if isinstance(ids, Exception) else PreparedInput(ids) for ids in encoded]

    def prepared_from_ids(self, token_ids: Sequence[int], image: ImageSource | None, *,
                          image_formats: Sequence[str] | None = None) -> PreparedInput:
        """An input tokenised elsewhere (by `prompter.encode`): checks the ids and that its image block fits."""
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            ids = np.asarray([-1])
        if ids.ndim != 1 or not len(ids):
            raise ValueError("token_ids must be a non-empty list of integers")
        vocab = self.config.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token_ids must lie in [0, {vocab})")
        ids = ids.astype(np.int32)
        tiles = self.tiles(image, image_formats) if image is not None else None
        special = self.prompter.special
        if tiles is not None:
            starts = np.flatnonzero(ids == special.img_start)
            block = len(tiles) * self.config.tokens_per_tile
            at = int(starts[0]) + 1 if len(starts) else -1
            if at < 0 or at + block > len(ids) or not np.all(ids[at:at + block] == special.img_context):
                raise ValueError(f"the prompt has no block of {block} image tokens for this image's "
                                 f"{len(tiles)} tiles")
        return PreparedInput(ids, tiles)
