"""The fixed set of shapes a forward pass may take, so every one is compiled before serving.

Length buckets grow by 1.5× or 1.33× (at most a third of a pass is padding), and image passes also have the exact
length of an image-only prompt for each tile count; rows per pass come from a padded-token budget (a long input
never shares a pass with many others, short ones are never padded to a long one's length); tiles per vision pass
are powers of two.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """16, 24, 32, 48, 64, 96, …: powers of two and 1.5× them (matmul-friendly, at most a third padding), then
    `max_length` itself rounded up to 16."""
    out, n = set(), smallest
    while n < max_length:
        out.update({n, n * 3 // 2})
        n *= 2
    top = round_up(max_length, 16)
    return tuple(sorted(b for b in out if b < top)) + (top,)


def geometric(cap: int, factor: int) -> tuple[int, ...]:
    """1, factor, factor², … below `cap`, then `cap`."""
    out, n = [], 1
    while n < cap:
        out.append(n)
        n *= factor
    return tuple(out) + (cap,)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    max_length: int  # the longest input allowed, in tokens
    max_batch_tokens: int  # padded tokens (rows × length) per forward pass
    max_rows: int
    max_tiles: int  # tiles per vision pass (an image has up to max_tiles_per_image)
    min_image_length: int  # the shortest prompt that holds an image (one tile, no text)
    row_factor: int = 2
    tokens_per_tile: int = 0  # with max_tiles_per_image: image passes also get each image-only prompt's length
    max_tiles_per_image: int = 0

    # The packer asks these for every input of every batch: computed once per plan.
    @functools.cached_property
    def lengths(self) -> tuple[int, ...]:
        return length_buckets(self.max_length)

    @functools.cached_property
    def image_lengths(self) -> tuple[int, ...]:
        """Lengths of image passes: the general ones, plus the prompt length of an image alone with 1, 2, … tiles
        (rounded up to 16). A one-tile image of the real model is 265 tokens: 272 instead of the 384 bucket."""
        exact = {round_up(self.min_image_length + (k - 1) * self.tokens_per_tile, 16)
                 for k in range(1, self.max_tiles_per_image + 1)} if self.tokens_per_tile else set()
        top = self.lengths[-1]
        return tuple(sorted({n for n in self.lengths if n >= self.min_image_length} | {n for n in exact if n < top}
                            | {top}))

    @functools.cached_property
    def tiles(self) -> tuple[int, ...]:
        return geometric(self.max_tiles, 2)

    @functools.lru_cache(maxsize=None)
    def row_cap(self, length: int, image: bool = False) -> int:
        cap = max(1, min(self.max_rows, self.max_batch_tokens // length))
        return min(cap, self.max_tiles) if image else cap

    @functools.lru_cache(maxsize=None)
    def rows(self, length: int, image: bool = False) -> tuple[int, ...]:
        return geometric(self.row_cap(length, image), self.row_factor)

    @functools.lru_cache(maxsize=None)
    def row_table(self, length: int, image: bool = False) -> tuple[int, ...]:
        """`rows_for(k, length, image)` for k = 0 … row_cap: the packer looks rows up instead of searching."""
        return (0,) + tuple(self.rows_for(k, length, image) for k in range(1, self.row_cap(length, image) + 1))

    def length_for(self, n_tokens: int, image: bool = False) -> int:
        lengths = self.image_lengths if image else self.lengths
        i = bisect.bisect_left(lengths, n_tokens)
        if i == len(lengths):
            raise ValueError(f"{n_tokens} tokens exceed the longest bucket {lengths[-1]}")
        return lengths[i]

    def rows_for(self, n_rows: int, length: int, image: bool = False) -> int:
        return next(r for r in self.rows(length, image) if r >= n_rows)

    def tiles_for(self, n_tiles: int) -> int:
        return next(t for t in self.tiles if t >= n_tiles)

    def text_shapes(self) -> list[tuple[int, int]]:
        return [(r, length) for length in self.lengths for r in self.rows(length)]

    def image_shapes(self) -> list[tuple[int, int]]:
        return [(r, length) for length in self.image_lengths for r in self.rows(length, image=True)]
