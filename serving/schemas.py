"""Request bodies, and the items that cross BentoML's batcher.

Validation messages are the API contract's own words; `describe_validation_error` turns pydantic's errors into one
message. Unknown fields are ignored: real clients (LangChain, LlamaIndex, the OpenAI SDK) send extras.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serving.errors import BadRequestError

MODALITIES = ("text", "image", "text_image")
INPUT_TYPES = ("query", "passage")
ENCODING_FORMATS = ("float", "base64")
TRUNCATE_MODES = ("NONE", "START", "END")
EmbeddingType = Literal["float", "binary", "ubinary", "int8", "uint8"]

# Errors raised with this type carry a complete message (naming the field); pydantic's own get the field prefixed.
_COMPLETE = "nim_invalid"


def _one_of(field: str, allowed: tuple[str, ...], got: Any) -> PydanticCustomError:
    choices = ", ".join(f"'{a}'" for a in allowed)
    return PydanticCustomError(_COMPLETE, "{field} must be one of {choices}; got {got}",
                               {"field": field, "choices": choices, "got": repr(got)})


def _complete(message: str) -> PydanticCustomError:
    return PydanticCustomError(_COMPLETE, message)  # type: ignore[arg-type]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    input: list[str]  # a bare string is accepted as a list of one
    input_type: str | None = None
    modality: list[str] | None = None  # a string, one batch-wide value, or one per input
    embedding_type: EmbeddingType = "float"
    encoding_format: str | None = None
    dimensions: StrictInt | None = None
    truncate: str | None = None
    user: str | None = None  # accepted and ignored (OpenAI clients send it)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _complete("input must be a string or a list of strings")
        if not value:
            raise _complete("input must not be empty")
        for i, v in enumerate(value):
            if not v.strip():
                raise _complete(f"input[{i}] must not be blank or empty")
        return value

    @field_validator("modality", mode="before")
    @classmethod
    def _modality(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise _complete("modality must be a string or a non-empty list of strings")
        for v in values:
            if v not in MODALITIES:
                raise _one_of("modality", MODALITIES, v)
        return values

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        if value is not None and value not in INPUT_TYPES:
            raise _one_of("input_type", INPUT_TYPES, value)
        return value

    @field_validator("encoding_format")
    @classmethod
    def _encoding_format(cls, value: str | None) -> str | None:
        if value is not None and value not in ENCODING_FORMATS:
            raise _one_of("encoding_format", ENCODING_FORMATS, value)
        return value

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, value: str | None) -> str | None:
        if value is not None and value not in TRUNCATE_MODES:
            raise _one_of("truncate", TRUNCATE_MODES, value)
        return value

    @model_validator(mode="after")
    def _modality_length(self) -> EmbeddingRequest:
        if self.modality is not None and len(self.modality) not in (1, len(self.input)):
            raise _complete(f"modality has {len(self.modality)} values for {len(self.input)} inputs; give one "
                            "value per input or a single batch-wide value")
        return self

    def modality_of(self, index: int) -> str | None:
        if self.modality is None:
            return None
        return self.modality[0] if len(self.modality) == 1 else self.modality[index]


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Parse and validate a raw body in one pass (pydantic's JSON parser: no intermediate objects for big bodies)."""
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as e:
        raise BadRequestError(describe_validation_error(e)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One client-facing message for the first problem (the one a client fixes first)."""
    err = error.errors(include_url=False, include_input=False)[0]
    if err["type"] == "json_invalid":
        return f"request body is not valid JSON: {err['ctx']['error']}"
    if err["type"] == "model_type" and not err["loc"]:
        return "request body must be a JSON object"
    # literal_error messages already list the allowed values, and the contract quotes them verbatim.
    if err["type"] in (_COMPLETE, "literal_error") or not err["loc"]:
        return err["msg"]
    loc = ".".join(str(part) for part in err["loc"])
    return f"{loc}: {err['msg']}"


# ---- /embed_batch, for BentoML's Python clients ------------------------------------------------------------------------
class BatchItem(BaseModel):
    """One input of `/embed_batch`: `token_ids`, or `text`/`image`/`input_type`, tokenised by the worker (errors stay
    per item)."""

    token_ids: list[int] | None = Field(None, description="the full prompt's token ids, image tokens included")
    image: str | None = Field(None, description="base64 of the image file's bytes (png, jpeg, webp, gif, bmp, tiff)")
    text: str | None = Field(None, description="raw text, when token_ids is not given")
    input_type: Literal["query", "passage"] = "passage"


class ItemError(BaseModel):
    status: int
    message: str


class BatchResult(BaseModel):
    """A vector (base64 of little-endian float32, L2-normalised) or the error of this item alone."""

    embedding: str | None = None
    tokens: int = 0
    error: ItemError | None = None
