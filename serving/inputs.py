"""What one input string holds (text, an image, or both) and whether its image is acceptable.

An image travels as a data URL `data:image/<type>;base64,<data>`, bare or inside `<img src="..."/>` (single or double
quotes). Nothing here fetches a URL, and image checks read only the header: pixels are decoded later, in the runner.
Errors are `ValueError`s with a message that the caller prefixes with `input[i]: `.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
import warnings

from PIL import Image

SUPPORTED_IMAGE_TYPES = ("png", "jpeg", "webp", "gif", "bmp", "tiff")
_TYPE_ALIASES = {"jpg": "jpeg", "tif": "tiff"}  # common non-standard spellings
# Pillow's format names: restricting `Image.open` to them means no other decoder ever sees client bytes.
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# `[\w.+-]+` also catches unsupported subtypes (svg+xml) so they fail loudly instead of passing as text.
# The payload has no whitespace, so text after a space ("data:...AAAA caption") is not swallowed as base64.
_DATA_URL = r"data:image/(?P<type>[\w.+-]+);base64,(?P<data>[A-Za-z0-9+/]*={0,2})"
_IMG_TAG = re.compile(r"""<img\s+src\s*=\s*(?P<q>["'])(?P<src>.*?)(?P=q)\s*/?>""", re.IGNORECASE | re.DOTALL)
_HEAD = re.compile(r"data:image/(?P<type>[\w.+-]+);base64,", re.IGNORECASE)
_PAYLOAD = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # without IGNORECASE: 5x faster over a multi-megabyte payload
_WHOLE = re.compile(_DATA_URL + r"\Z", re.IGNORECASE | re.DOTALL)


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
        url = _WHOLE.match(m.group("src").strip())
        if url is not None:
            found.append((m.start(), m.end(), url.group("type"), url.group("data")))
            tags.append((m.start(), m.end()))
    outside_tags = value
    for start, end in tags:  # blank the tags out, keeping offsets, so their URLs are not found twice
        outside_tags = outside_tags[:start] + " " * (end - start) + outside_tags[end:]
    pos = 0
    while (head := _HEAD.search(outside_tags, pos)) is not None:  # resume after each payload, never scan it twice
        payload = _PAYLOAD.match(outside_tags, head.end())
        found.append((head.start(), payload.end(), head.group("type"), payload.group()))
        pos = payload.end()
    return sorted(found)


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
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data is not valid base64") from None


def inspect_image(b64: str, *, max_bytes: int, max_short_side: int, max_long_side: int) -> ImageInfo:
    """Check an image's size, format and dimensions from its header; no pixel is decoded."""
    size = decoded_size(b64)
    if size > max_bytes:
        raise ValueError(f"image is {size} bytes; the limit is {max_bytes} bytes")
    raw = decode_base64(b64)
    if not raw:
        raise ValueError("image data is empty")
    try:
        with Image.open(io.BytesIO(raw), formats=PILLOW_FORMATS) as im:  # reads the header only
            width, height, fmt = im.width, im.height, im.format or "?"
    except Image.DecompressionBombError:  # more pixels than the limit's area (see limit_pillow_pixels)
        raise ValueError(f"image exceeds the limit of {max_short_side}x{max_long_side} pixels (either orientation)"
                         ) from None
    except Exception:  # Pillow raises many types for bad data; the client only needs to know it is unusable
        raise ValueError("image data is corrupt or not a supported format ("
                         + ", ".join(SUPPORTED_IMAGE_TYPES) + ")") from None
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if min(width, height) > max_short_side or max(width, height) > max_long_side:
        raise ValueError(f"image of {width}x{height} pixels exceeds the limit of {max_short_side}x{max_long_side} "
                         "(either orientation)")
    return ImageInfo(width, height, fmt.lower(), size)


def limit_pillow_pixels(max_short_side: int, max_long_side: int) -> None:
    """Make Pillow's own decompression-bomb guard refuse exactly the images larger than our limit allows.

    `Image.open` raises DecompressionBombError, from the header alone, for more than 2 × MAX_IMAGE_PIXELS pixels
    (and only warns above 1 ×). Its default (~179 MP refused) is not our limit, and `None` would disable the guard:
    every decode, the runner's included, is then bounded even for an item that skipped `inspect_image`. The warning
    band is silenced: our own dimension check decides there. Process-wide, hence called once at start-up.
    """
    Image.MAX_IMAGE_PIXELS = max_short_side * max_long_side // 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
