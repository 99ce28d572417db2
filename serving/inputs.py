"""What one input string holds (text, an image, or both) and whether its image is acceptable.

An image travels as a data URL `data:image/<type>;base64,<data>`, bare or inside `<img src="..."/>` (single or double
quotes). Nothing here fetches a URL, and image checks read only the header: this is the edge's policy (formats, bytes,
dimensions). Pixels are decoded later, on the engine's pool, by the model's processor (model/processor.py): the same
decode and RGB conversion as the Python API's.
Errors are `ValueError`s with a message that the caller prefixes with `input[i]: `.
"""

from __future__ import annotations

import binascii
import dataclasses
import io
import re
import warnings

import pybase64
from PIL import Image

SUPPORTED_IMAGE_TYPES = ("png", "jpeg", "webp", "gif", "bmp", "tiff")
_TYPE_ALIASES = {"jpg": "jpeg", "tif": "tiff"}  # common non-standard spellings
# Pillow's format names: restricting `Image.open` to them means no other decoder ever sees client bytes.
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# `[\w.+-]+` also catches unsupported subtypes (svg+xml) so they fail loudly instead of passing as text.
# The payload has no whitespace, so text after a space ("data:...AAAA caption") is not swallowed as base64.
_IMG_TAG = re.compile(r"""<img\s+src\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')\s*/?>""", re.IGNORECASE)
_HEAD = re.compile(r"data:image/(?P<type>[\w.+-]+);base64,", re.IGNORECASE)
_PAYLOAD = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # without IGNORECASE: much faster over a multi-megabyte payload


@dataclasses.dataclass(frozen=True)
class ParsedInput:
    modality: str  # "text", "image" or "text_image"
    text: str | None  # the text with the image removed and stripped; the verbatim input for "text"
    image: str | None  # the base64 payload of the image's data URL


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    num_bytes: int


def _images(value: str) -> list[tuple[int, int, str, str]]:
    """(start, end, type, base64) of every image in `value`: `<img>` tags with a data URL, then bare data URLs.

    A tag whose src is not a data URL (an http link in scraped HTML) is left as text: URLs are never fetched.
    """
    found, tags = [], []
    for m in _IMG_TAG.finditer(value):
        src = (m.group("dq") if m.group("dq") is not None else m.group("sq")).strip()
        head = _HEAD.match(src)
        if head is not None and _payload_end(src, head.end()) == len(src):
            found.append((m.start(), m.end(), head.group("type"), src[head.end():]))
            tags.append((m.start(), m.end()))
    outside_tags = value
    for start, end in tags:  # blank the tags out, keeping offsets, so their URLs are not found twice
        outside_tags = outside_tags[:start] + " " * (end - start) + outside_tags[end:]
    pos = 0
    while (head := _HEAD.search(outside_tags, pos)) is not None:  # resume after each payload, never scan it twice
        end = _payload_end(outside_tags, head.end())
        found.append((head.start(), end, head.group("type"), outside_tags[head.end():end]))
        pos = end
    return sorted(found)


def _payload_end(value: str, start: int) -> int:
    """Where the base64 payload that begins at `start` ends. Usually it runs to the end of the input (a bare data
    URL, or text then an image), which decoding it confirms at memory speed; otherwise a regex finds the end."""
    try:
        pybase64.b64decode(value[start:], validate=True)
        return len(value)
    except ValueError:  # binascii.Error included: text after the payload (or padding that decoding will refuse)
        return _PAYLOAD.match(value, start).end()


def _image_type(declared: str) -> str:
    kind = _TYPE_ALIASES.get(declared.lower(), declared.lower())
    if kind not in SUPPORTED_IMAGE_TYPES:
        raise ValueError(f"unsupported image type 'image/{declared}'; supported: "
                         + ", ".join(SUPPORTED_IMAGE_TYPES))
    return kind


def parse_input(value: str, modality: str | None) -> ParsedInput:
    """Split one input into text and image, inferring the modality when it is not given."""
    if modality == "text":
        return ParsedInput("text", value, None)  # explicit text is used verbatim, data URLs included
    images = _images(value)
    if len(images) > 1:
        raise ValueError(f"found {len(images)} images; an input may hold at most one")
    if not images:
        if modality is not None:
            raise ValueError(f"modality '{modality}' needs an image as a base64 data URL "
                             "(data:image/png;base64,...); image URLs are not fetched")
        return ParsedInput("text", value, None)
    start, end, kind, data = images[0]
    _image_type(kind)
    text = " ".join(part for part in (value[:start].strip(), value[end:].strip()) if part)
    inferred = "text_image" if text else "image"
    if modality is not None and modality != inferred:
        need = "exactly one image and no text" if modality == "image" else "text and exactly one image"
        raise ValueError(f"modality '{modality}' needs {need}")
    return ParsedInput(inferred, text or None, data)


def decoded_size(b64: str) -> int:
    """Bytes that a base64 payload decodes to, without decoding it."""
    return len(b64) // 4 * 3 - b64[-2:].count("=") if b64 else 0


def decode_base64(b64: str) -> bytes:
    try:
        return pybase64.b64decode(b64, validate=True)  # vectorised (SIMD), unlike the standard library
    except (binascii.Error, ValueError):
        raise ValueError("image data is not valid base64") from None


def inspect_image(b64: str, *, max_bytes: int, max_short_side: int, max_long_side: int) -> ImageInfo:
    """Check an image's size, format and dimensions from its header; no pixel is decoded."""
    size = decoded_size(b64)
    if size > max_bytes:
        raise ValueError(f"image is {size} bytes; the limit is {max_bytes} bytes")
    fmt = None
    if len(b64) > HEADER_CHARS:  # a page's base64 is megabytes: its header is in the first few kilobytes
        try:
            width, height, fmt = _header(decode_base64(b64[:HEADER_CHARS]))
        except Image.DecompressionBombError:
            raise ValueError(_too_many_pixels(max_short_side, max_long_side)) from None
        except Exception:  # the header is further in (a JPEG with large metadata, a TIFF), or the data is bad
            fmt = None
    if fmt is None:
        width, height, fmt = _header_of_all(b64, max_short_side, max_long_side)
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if min(width, height) > max_short_side or max(width, height) > max_long_side:
        raise ValueError(f"image of {width}x{height} pixels exceeds the limit of {max_short_side}x{max_long_side} "
                         "(either orientation)")
    return ImageInfo(width, height, fmt.lower(), size)


# Base64 characters decoded to read a large image's header: 48 KiB of file, where PNG, GIF, WebP, BMP and most JPEGs
# have it (else the whole file is). The rest is decoded and checked once, with the pixels, on the engine's pool.
HEADER_CHARS = 64 * 1024


def _header(raw: bytes) -> tuple[int, int, str]:
    with Image.open(io.BytesIO(raw), formats=PILLOW_FORMATS) as im:  # reads the header only
        return im.width, im.height, im.format or "?"


def _header_of_all(b64: str, max_short_side: int, max_long_side: int) -> tuple[int, int, str]:
    raw = decode_base64(b64)
    if not raw:
        raise ValueError("image data is empty")
    try:
        return _header(raw)
    except Image.DecompressionBombError:  # more pixels than the limit's area (see limit_pillow_pixels)
        raise ValueError(_too_many_pixels(max_short_side, max_long_side)) from None
    except Exception:  # Pillow raises many types for bad data; the client only needs to know it is unusable
        raise ValueError("image data is corrupt or not a supported format ("
                         + ", ".join(SUPPORTED_IMAGE_TYPES) + ")") from None


def _too_many_pixels(max_short_side: int, max_long_side: int) -> str:
    return f"image exceeds the limit of {max_short_side}x{max_long_side} pixels (either orientation)"


def limit_pillow_pixels(max_short_side: int, max_long_side: int) -> None:
    """Make Pillow's own decompression-bomb guard refuse exactly the images larger than our limit allows.

    `Image.open` raises DecompressionBombError, from the header alone, for more than 2 × MAX_IMAGE_PIXELS pixels
    (and only warns above 1 ×). Its default (~179 MP refused) is not our limit, and `None` would disable the guard:
    every decode, the runner's included, is then bounded even for an item that skipped `inspect_image`. The warning
    band is silenced: our own dimension check decides there. Process-wide, hence called once at start-up.
    """
    Image.MAX_IMAGE_PIXELS = max_short_side * max_long_side // 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
