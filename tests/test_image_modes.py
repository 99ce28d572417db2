"""Every door hands the model the same pixels for the same bytes: the reference processor's `convert("RGB")`.

For each image mode a client may send (made here, encoded as a client would), the server's path (header check and
token ids at the edge, then base64 -> bytes -> the engine), the Python API given the bytes and the Python API given
a PIL image all give the PyTorch reference's vector, and the tiles equal the reference processor's exactly. The HTTP
door itself is checked against the Python API in tests/test_hardening_http.py.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.processor import load_image
from tests.reference import ReferenceModel
from tests.reference import tile_image as reference_tiles

F32_COSINE = 0.99999
SIZE = (128, 64)  # the tiny checkpoint's 64-px tiles: a 2×1 grid and a thumbnail


def picture(mode_seed: int) -> np.ndarray:
    """uint8 [H, W, 3] with structure (a gradient) and noise, so tiles and resizing both show."""
    rng = np.random.default_rng(mode_seed)
    width, height = SIZE
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 2, y * 4, (x + y) * 1.3], -1) + rng.normal(0, 30, (height, width, 3))
    return base.clip(0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def transparent_band(height: int) -> np.ndarray:
    """Alpha: opaque, but fully transparent over a band of rows, with half-transparent rows around it."""
    alpha = np.full((height, SIZE[0]), 255, np.uint8)
    alpha[height // 4: height // 2] = 0
    alpha[height // 2: height // 2 + 4] = 128
    return alpha


def rgba() -> bytes:
    pixels = np.dstack([picture(1), transparent_band(SIZE[1])])  # colours stay under the transparent band
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def la() -> bytes:
    grey = picture(2)[..., 0]
    return encode(Image.fromarray(np.dstack([grey, transparent_band(SIZE[1])]), "LA"), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.fromarray(picture(3)).quantize(16)
    index = int(np.bincount(np.asarray(image).ravel()).argmax())  # the commonest colour becomes transparent
    return encode(image, "PNG", transparency=index)


def grey() -> bytes:
    return encode(Image.fromarray(picture(4)[..., 1], "L"), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(picture(5)).convert("CMYK"), "JPEG", quality=95)


def sixteen_bit() -> bytes:
    """A 16-bit grey PNG whose values straddle 255: Pillow's convert("RGB") clips them there, as the reference
    processor's does."""
    ramp = picture(6)[..., 0].astype(np.uint16) * 2  # 0 … 510
    return encode(Image.fromarray(ramp), "PNG")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return encode(Image.fromarray(picture(7)), "JPEG", quality=95, exif=exif.tobytes())


CASES = {  # name -> (encoded image, the mode Pillow decodes it in)
    "RGBA": (rgba(), "RGBA"),
    "LA": (la(), "LA"),
    "P+tRNS": (palette_with_transparency(), "P"),
    "L": (grey(), "L"),
    "CMYK JPEG": (cmyk_jpeg(), "CMYK"),
    "I;16": (sixteen_bit(), "I;16"),
    "EXIF-rotated JPEG": (exif_rotated_jpeg(), "RGB"),
}


def opened(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_cases_are_what_they_claim():
    for name, (raw, mode) in CASES.items():
        image = opened(raw)
        assert image.mode == mode, name
        assert image.size == SIZE, name
    assert "transparency" in opened(CASES["P+tRNS"][0]).info
    assert opened(CASES["EXIF-rotated JPEG"][0]).getexif()[0x0112] == 6
    assert np.asarray(opened(CASES["I;16"][0])).max() > 255


@pytest.mark.parametrize("name", list(CASES))
def test_tiles_equal_the_reference_processors(tiny_embedder, name):
    raw, _ = CASES[name]
    size = tiny_embedder.config.force_image_size
    theirs = np.stack([np.asarray(t) for t in reference_tiles(opened(raw), size, tiny_embedder.max_tiles)])
    np.testing.assert_array_equal(tiny_embedder.processor.tiles(raw), theirs)  # from the bytes
    np.testing.assert_array_equal(tiny_embedder.tiles(opened(raw)), theirs)  # from a PIL image


def test_conversion_is_pillows_convert_rgb_and_nothing_else():
    """Alpha dropped, not composited; 16-bit clipped; no EXIF rotation: what `image.convert("RGB")` gives."""
    for name, (raw, _) in CASES.items():
        np.testing.assert_array_equal(np.asarray(load_image(raw)), np.asarray(opened(raw).convert("RGB")), name)
    band = np.asarray(load_image(CASES["RGBA"][0]))[SIZE[1] // 4: SIZE[1] // 2]
    np.testing.assert_array_equal(band, picture(1)[SIZE[1] // 4: SIZE[1] // 2])  # the hidden colours, not white
    assert load_image(CASES["EXIF-rotated JPEG"][0]).size == SIZE  # not turned to 64×128


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceModel.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def served(tiny_embedder):
    """The server's path without HTTP: the edge's header check and token ids (serving/prepare.py), then the runner
    (base64 -> bytes -> the engine's pool -> the processor), with the formats the server accepts."""
    from engine import EngineConfig
    from serving.inputs import PILLOW_FORMATS, parse_input
    from serving.prepare import prepare_item
    from serving.runner import Runner
    from serving.settings import Settings

    runner = Runner(tiny_embedder, EngineConfig(max_length=160, max_batch_tokens=512, max_rows=8, max_tiles=8,
                                                image_formats=PILLOW_FORMATS))
    settings = Settings.from_env({})

    def embed(raw: bytes, fmt: str) -> np.ndarray:
        url = f"data:image/{fmt};base64,{base64.b64encode(raw).decode()}"
        token_ids, image = prepare_item(parse_input(url, None), None, "NONE", tiny_embedder, settings)
        [vector] = runner.embed_sync([(token_ids, image)])
        assert isinstance(vector, np.ndarray), vector
        return vector

    yield embed
    runner.close()


@pytest.mark.parametrize("name", list(CASES))
def test_every_door_gives_the_reference_vector(tiny_embedder, reference, served, name):
    raw, _ = CASES[name]
    fmt = "jpeg" if "JPEG" in name else "png"
    by_server = served(raw, fmt)
    by_bytes, by_pil = tiny_embedder.embed([{"image": raw}, {"image": opened(raw)}])
    [theirs] = reference.embed([{"image": opened(raw), "input_type": "passage"}],
                               max_tiles=tiny_embedder.max_tiles)
    assert by_server.dtype == by_bytes.dtype == np.float32
    np.testing.assert_array_equal(by_bytes, by_pil)
    assert cosine(by_server, by_bytes) >= F32_COSINE
    np.testing.assert_allclose(by_server, by_bytes, atol=1e-5)
    assert cosine(by_bytes, theirs) >= F32_COSINE
    assert cosine(by_server, theirs) >= F32_COSINE
