"""RGB conversion and dynamic tiling of an image into S×S tiles, exactly as the reference processor does, on the host.

Tiles stay uint8 (RGB, channels last): normalisation happens on the device.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=16)
def candidate_grids(max_tiles: int, min_tiles: int = 1) -> tuple[tuple[int, int], ...]:
    """(cols, rows) grids with min ≤ cols·rows ≤ max, ordered by tile count.

    Ties keep the order in which CPython iterates this very set (the reference builds it this way; tuples of
    small ints hash deterministically), so the same expression is the specification.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The first grid with the strictly best score min(coverage, 0.6) · aspect match."""
    aspect = width / height
    best, best_score = (1, 1), -1.0
    for cols, rows in candidate_grids(max_tiles):
        coverage = min(cols * rows * tile_size * tile_size / (width * height), 0.6)
        ratio = cols / rows
        score = coverage * min(ratio / aspect, aspect / ratio)
        if score > best_score:
            best, best_score = (cols, rows), score
    return best


def num_tiles(width: int, height: int, tile_size: int, max_tiles: int, use_thumbnail: bool) -> int:
    """Tiles an image of this size becomes (from its header alone, before any pixel is decoded)."""
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def to_rgb(image: Image.Image) -> Image.Image:
    """The reference processor's `image.convert("RGB")`, nothing more: alpha is dropped (not composited), a palette's
    transparency is ignored, 16-bit greyscale clips at 255, CMYK uses Pillow's formula and EXIF orientation is not
    applied. Users who want pages flattened on white do it before embedding."""
    return image if image.mode == "RGB" else image.convert("RGB")


def tile_image(image: Image.Image, tile_size: int, max_tiles: int, use_thumbnail: bool) -> np.ndarray:
    """-> uint8 [n, S, S, 3]: the row-major grid tiles, then the thumbnail when there is more than one."""
    image = to_rgb(image)
    cols, rows = choose_grid(image.width, image.height, tile_size, max_tiles)
    resized = np.asarray(image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC))
    s = tile_size
    tiles = resized.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    if use_thumbnail and len(tiles) > 1:
        thumb = np.asarray(image.resize((s, s), Image.BICUBIC))
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return np.ascontiguousarray(tiles)
