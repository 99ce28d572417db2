"""Turn prepared inputs into padded `Batch`es: the host half of a forward pass.

Policy (which inputs share a pass, which sizes to pad to) belongs to the caller; this module only collates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.network import Batch


@dataclasses.dataclass(frozen=True)
class PreparedInput:
    """One input ready for the device: its token ids and, for an image, its uint8 tiles [n, S, S, 3]."""

    token_ids: np.ndarray
    tiles: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(len(self.token_ids))

    @property
    def num_tiles(self) -> int:
        return 0 if self.tiles is None else int(len(self.tiles))


def collate(inputs: list[PreparedInput], *, length: int, rows: int, tiles: int, img_start_id: int,
            img_context_id: int, tokens_per_tile: int) -> Batch:
    """Right-pad `inputs` into a Batch of `rows` × `length` tokens and `tiles` tile slots.

    Padded rows get length 1 (a real-looking row, discarded by the caller) so no row is fully masked.
    With no tile in `inputs` the batch has no image fields and the vision tower is not run.
    """
    if len(inputs) > rows or max(p.num_tokens for p in inputs) > length:
        raise ValueError("inputs do not fit the requested batch shape")
    ids = np.zeros((rows, length), np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, p in enumerate(inputs):
        ids[r, : p.num_tokens] = p.token_ids
        lengths[r] = p.num_tokens
    total_tiles = sum(p.num_tiles for p in inputs)
    if total_tiles == 0:
        return Batch(ids, lengths)
    if total_tiles > tiles:
        raise ValueError(f"{total_tiles} tiles do not fit {tiles} tile slots")
    tile_shape = next(p.tiles for p in inputs if p.tiles is not None).shape[1:]
    pixels = np.zeros((tiles, *tile_shape), np.uint8)
    image_index = np.full((rows, length), -1, np.int32)
    offset = 0
    for r, p in enumerate(inputs):
        if not p.num_tiles:
            continue
        pixels[offset // tokens_per_tile: offset // tokens_per_tile + p.num_tiles] = p.tiles
        # The image block directly follows the prompt's first `<img>`; user text after it may spell special
        # tokens too, and those stay plain token embeddings.
        start = int(np.flatnonzero(p.token_ids == img_start_id)[0]) + 1
        slots = start + np.arange(p.num_tiles * tokens_per_tile)
        if not np.all(p.token_ids[slots] == img_context_id):
            raise ValueError("input's image block does not match its tiles")
        image_index[r, slots] = offset + np.arange(len(slots), dtype=np.int32)
        offset += len(slots)
    return Batch(ids, lengths, image_index, pixels)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
