"""One request -> validated, tokenised batch items: everything that can fail for a client's reason fails here,
before anything is batched, so that one bad input never reaches a batch-mate.

The image header (not its pixels) gives the tile count, hence the exact token count: token limits and `usage` are
known before the forward pass.
"""

from __future__ import annotations

import dataclasses
import functools

from model import Embedder
from serving.errors import BadRequestError, NotFoundError
from serving.inputs import ParsedInput, inspect_image, parse_input
from serving.schemas import BatchItem, EmbeddingRequest
from serving.settings import Settings


# What the model gets for one input: its prompt's token ids (image tokens included) and its image's base64, if any.
ModelInput = tuple[list[int], "str | None"]

# The API reference's own words for an image sent as a query.
IMAGE_AS_QUERY = ('input_type="query" is not supported with images; the VLM model processes images as passages only. '
                  'Use input_type="passage" or omit input_type.')


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    inputs: list[ModelInput]
    modalities: list[str]

    @property
    def tokens(self) -> list[int]:
        return [len(ids) for ids, _ in self.inputs]


def model_input_type(model: str, served: str) -> str | None:
    """The input_type a model id implies: NIM accepts `<id>-query` / `<id>-passage` for plain OpenAI clients."""
    if model == served:
        return None
    for input_type in ("query", "passage"):
        if model == f"{served}-{input_type}":
            return input_type
    raise NotFoundError(f"model '{model}' not found; available: '{served}'")


def default_input_type(modality: str) -> str:
    """NIM's default: images are documents, bare text is a query."""
    return "query" if modality == "text" else "passage"


# Characters kept beyond the limit when a text is cut before tokenising, in tokens' worth: the cut changes only the
# tokens of the word it falls in, far past the tokens that truncation keeps.
CUT_MARGIN_TOKENS = 64


@functools.lru_cache(maxsize=8)
def chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary (byte-level entries are one
    character per byte and a character is at least a byte), special tokens included."""
    return max(len(token) for token in tokenizer.get_vocab(with_added_tokens=True))


def cap_text(text: str | None, max_tokens: int, truncate: str, per_token: int) -> str | None:
    """Cut a text that cannot fit by characters, before tokenising it: a 100 MB string is never tokenised.

    A text longer than `max_tokens * per_token` characters has more than `max_tokens` tokens whatever it says, so
    it is refused (NONE) or cut to that many characters plus a margin (END keeps the head, START the tail), which
    leaves the tokens that truncation keeps exactly as a full tokenisation would give them.
    """
    limit = max_tokens * per_token
    if text is None or len(text) <= limit:
        return text
    if truncate == "NONE":
        raise ValueError(f"Input length exceeds maximum allowed token size {max_tokens}: {len(text)} characters "
                         f"are more than {max_tokens} tokens can hold")
    keep = limit + CUT_MARGIN_TOKENS * per_token
    if truncate == "END":
        return text[:keep]
    # START keeps the tail. The text's first character stays in front of it: how the prompt's last space tokenises
    # depends on it (a space merges into " word" but not into "  "), and so does how many text tokens are kept.
    return text[0] + text[-keep:]


def prepare_item(parsed: ParsedInput, input_type: str | None, truncate: str, embedder: Embedder,
                 settings: Settings) -> ModelInput:
    """Raises ValueError (InputTooLongError included) with a message for the client."""
    input_type = input_type or default_input_type(parsed.modality)
    max_tokens = settings.max_tokens(parsed.modality)
    text = cap_text(parsed.text, max_tokens, truncate, chars_per_token(embedder.prompter.tokenizer))
    tiles = 0
    if parsed.image is not None:
        if input_type != "passage":
            raise ImageAsQueryError(IMAGE_AS_QUERY)
        info = inspect_image(parsed.image, max_bytes=settings.max_image_bytes,
                             max_short_side=settings.max_image_short_side,
                             max_long_side=settings.max_image_long_side)
        tiles = embedder.num_tiles(info.width, info.height)
    ids = embedder.prompter.encode(text, tiles, input_type, truncate, max_tokens)
    return ids.tolist(), parsed.image


def prepare_request(request: EmbeddingRequest, input_type: str | None, embedder: Embedder,
                    settings: Settings) -> PreparedRequest:
    """`input_type`: the body's, else the one the model suffix implies, else None (per-modality default)."""
    if len(request.input) > settings.max_inputs:
        raise BadRequestError(f"input has {len(request.input)} items; at most {settings.max_inputs} are allowed "
                              "per request")
    truncate = request.truncate or "NONE"
    inputs, modalities = [], []
    for i, value in enumerate(request.input):
        try:
            parsed = parse_input(value, request.modality_of(i))
            inputs.append(prepare_item(parsed, input_type, truncate, embedder, settings))
        except ImageAsQueryError as e:
            raise BadRequestError(str(e)) from None  # verbatim, as the API reference words it
        except ValueError as e:
            raise BadRequestError(f"input[{i}]: {e}") from None
        modalities.append(parsed.modality)
    return PreparedRequest(inputs, modalities)


def complete_item(item: BatchItem, embedder: Embedder, settings: Settings) -> ModelInput:
    """An item that a direct BentoML client sent: its token ids as given (checked by the engine), or its text/image
    tokenised here (truncate NONE). Raises ValueError."""
    image = item.image
    if item.token_ids is not None:
        if not item.token_ids:
            raise ValueError("token_ids must not be empty")
        return list(item.token_ids), _payload(image)
    image = _payload(image)
    if image is None and not (item.text or "").strip():
        raise ValueError("an item needs token_ids, text or an image")
    modality = "text" if image is None else ("text_image" if (item.text or "").strip() else "image")
    parsed = ParsedInput(modality, item.text, image)
    return prepare_item(parsed, item.input_type, "NONE", embedder, settings)


def _payload(image: str | None) -> str | None:
    if image is not None and image.startswith("data:"):
        return image.partition(",")[2]  # a data URL's payload; its header is not needed to decode the image
    return image


class ImageAsQueryError(ValueError):
    """An image with input_type "query": the reference's message names no input."""
