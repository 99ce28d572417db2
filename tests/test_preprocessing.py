"""Host-side preprocessing: tiling, prompts, tokenisation and truncation."""

import numpy as np
import pytest
from PIL import Image

from model.tiling import candidate_grids, choose_grid, num_tiles, tile_image
from model.tokenization import InputTooLongError


def test_candidate_order_for_six_tiles_is_the_references():
    assert candidate_grids(6) == ((1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1),
                                  (6, 1), (2, 3), (1, 6), (3, 2))


@pytest.mark.parametrize("size, grid, tiles", [
    ((512, 512), (1, 1), 1),
    ((1536, 512), (3, 1), 4),      # wide 3:1 -> 3 tiles + thumbnail
    ((512, 2048), (1, 4), 5),      # tall 1:4 -> 4 tiles + thumbnail
    ((20, 20), (1, 1), 1),         # tiny
    ((1024, 1024), (2, 2), 5),     # square: 2×2 reaches the 0.6 coverage cap, 1×1 only 0.25
    ((1700, 2200), (2, 3), 7),     # a scanned page
    ((4000, 3000), (3, 2), 7),     # large landscape photo
    ((1000, 500), (2, 1), 3),
])
def test_grids_and_tile_counts_at_512(size, grid, tiles):
    assert choose_grid(*size, tile_size=512, max_tiles=6) == grid
    assert num_tiles(*size, tile_size=512, max_tiles=6, use_thumbnail=True) == tiles


def test_tiles_are_row_major_then_thumbnail():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))  # 3:2 at S=64 -> (3, 2)
    tiles = tile_image(image, 64, 6, True)
    assert tiles.shape == (7, 64, 64, 3) and tiles.dtype == np.uint8
    resized = np.asarray(image.resize((192, 128), Image.BICUBIC))
    np.testing.assert_array_equal(tiles[1], resized[0:64, 64:128])   # row 0, col 1
    np.testing.assert_array_equal(tiles[3], resized[64:128, 0:64])   # row 1, col 0
    np.testing.assert_array_equal(tiles[6], np.asarray(image.resize((64, 64), Image.BICUBIC)))
    assert tile_image(image, 64, 6, False).shape[0] == 6


def test_modes_are_converted_to_rgb():
    for mode in ("L", "P", "RGBA", "CMYK", "I;16"):
        image = Image.new(mode, (30, 40))
        assert tile_image(image, 64, 6, True).shape[1:] == (64, 64, 3)


def decode(embedder, ids):
    return embedder.prompter.tokenizer.decode(list(ids), skip_special_tokens=False)


def test_prompts(tiny_embedder):
    p, tpt = tiny_embedder.prompter, tiny_embedder.config.tokens_per_tile
    tok = p.tokenizer
    assert list(p.encode("hello world", 0, "query")) == tok.encode("query: hello world").ids
    assert list(p.encode("hello world", 0, "passage")) == tok.encode("passage: hello world").ids
    image = "<img>" + "<IMG_CONTEXT>" * (2 * tpt) + "</img> "
    assert list(p.encode(None, 2, "passage")) == tok.encode("passage: " + image).ids  # trailing space kept
    assert list(p.encode("a caption", 2, "passage")) == tok.encode("passage: " + image + "a caption").ids
    assert p.encode("x", 0, "query")[0] == p.special.bos
    with pytest.raises(ValueError, match="input_type"):
        p.encode("x", 0, "document")


def test_truncation_keeps_bos_prefix_and_image(tiny_embedder):
    p, tpt = tiny_embedder.prompter, tiny_embedder.config.tokens_per_tile
    text = " ".join(f"word{i}" for i in range(200))
    full = p.encode(text, 0, "query")
    with pytest.raises(InputTooLongError, match=f"Input length {len(full)} exceeds maximum allowed token size 50"):
        p.encode(text, 0, "query", "NONE", 50)
    end, start = p.encode(text, 0, "query", "END", 50), p.encode(text, 0, "query", "START", 50)
    assert len(end) == len(start) == 50
    np.testing.assert_array_equal(end, full[:50])
    head = len(p.tokenizer.encode("query:").ids)  # BOS + "query" + ":"
    np.testing.assert_array_equal(start[:head], full[:head])
    np.testing.assert_array_equal(start[head:], full[len(full) - (50 - head):])
    assert decode(tiny_embedder, start).startswith("<|begin_of_text|>query:")
    assert decode(tiny_embedder, start).endswith("word199")

    with_image = p.encode(text, 3, "passage", "START", 40)
    assert len(with_image) == 40
    assert (with_image == p.special.img_context).sum() == 3 * tpt
    assert p.encode(text, 3, "passage")[: 3 * tpt + 5].tolist() == with_image[: 3 * tpt + 5].tolist()
    with pytest.raises(InputTooLongError):  # image tokens alone exceed the limit: never cut
        p.encode(text, 3, "passage", "END", 3 * tpt)
    assert len(p.encode("short", 0, "query", "END", 50)) < 50  # nothing to cut


def test_encode_batch_gives_each_input_what_encode_gives_it(tiny_embedder):
    p = tiny_embedder.prompter
    long = " ".join(f"word{i}" for i in range(200))
    cases = [("a query", "query", "NONE", None), (long, "passage", "END", 50), (long, "query", "START", 50),
             (long, "passage", "NONE", 50), ("x", "document", "NONE", None), ("short", "query", "END", 50),
             (" leading space", "passage", "NONE", None), ("x", "query", "SIDEWAYS", None)]
    got = p.encode_batch(*map(list, zip(*cases)))
    for (text, input_type, truncate, limit), ids in zip(cases, got):
        try:
            expected = p.encode(text, 0, input_type, truncate, limit)
        except ValueError as e:
            assert type(ids) is type(e) and str(ids) == str(e)
        else:
            np.testing.assert_array_equal(ids, expected)
    assert sum(isinstance(x, Exception) for x in got) == 3  # too long, bad input_type, bad truncate


def test_user_text_cannot_steal_image_slots(tiny_embedder):
    """Special tokens spelled in user text stay text: they never receive another input's image features."""
    e = tiny_embedder
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    tricky = {"text": "see <img><IMG_CONTEXT></img>", "image": None, "input_type": "passage"}
    alone = e.embed([tricky])
    mixed = e.embed([{"text": None, "image": image, "input_type": "passage"}, tricky,
                     {"text": "caption <IMG_CONTEXT>", "image": image, "input_type": "passage"}])
    np.testing.assert_allclose(mixed[1], alone[0], atol=1e-5)
