"""Configuration from environment variables, validated once at start-up into a frozen object.

Every field's alias is its environment variable; `Settings.from_env()` is the only reader of the environment, so
the class below is the whole configuration surface.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conversion.resolve import DEFAULT_REPO_ID as DEFAULT_MODEL_ID

MiB = 1 << 20


class Settings(BaseModel):
    # Frozen: read once, shared by every request; protected_namespaces off because fields start with "model_".
    model_config = ConfigDict(frozen=True, populate_by_name=True, protected_namespaces=(), extra="forbid")

    # ---- the model ----------------------------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL_ID, alias="EMBED_MODEL", min_length=1,
                       description="Hub id, Hugging Face layout directory or converted directory")
    model_revision: str | None = Field(None, alias="EMBED_MODEL_REVISION", description="Hub revision (Hub ids only)")
    model_name: str = Field(DEFAULT_MODEL_ID, alias="EMBED_MODEL_NAME", min_length=1,
                            description="served model id (`model` in requests, /v1/models)")
    dtype: Literal["float32", "bfloat16", "fp8"] | None = Field(
        None, alias="EMBED_DTYPE", description="compute dtype; default bfloat16 on GPU, float32 on CPU; fp8: e4m3 "
                                               "linear layers, GPUs of compute capability >= 8.9 only")
    max_tiles: int = Field(6, alias="EMBED_MAX_TILES", ge=1, description="image tiles before the thumbnail")
    attention: Literal["cudnn", "xla", "blocked"] | None = Field(
        None, alias="EMBED_ATTENTION", description="attention kernel; default: cuDNN's on GPUs where a probe at load "
                                                   "runs it (else XLA's), per input length on CPUs")

    # ---- request limits (the API contract) -------------------------------------------------------------------
    # Tokens per input, counted with BOS, the prompt prefix and the image tokens.
    max_tokens_text: int = Field(8192, alias="EMBED_MAX_TOKENS_TEXT", ge=8, description="tokens of a text input")
    max_tokens_image: int = Field(2048, alias="EMBED_MAX_TOKENS_IMAGE", ge=8, description="tokens of an image input")
    max_tokens_text_image: int = Field(10240, alias="EMBED_MAX_TOKENS_TEXT_IMAGE", ge=8,
                                       description="tokens of a text+image input")
    max_inputs: int = Field(2048, alias="EMBED_MAX_INPUTS", ge=1, description="inputs per request")
    max_body_bytes: int = Field(128 * MiB, alias="EMBED_MAX_BODY_BYTES", ge=1024, description="request body (413)")
    max_image_bytes: int = Field(25 * MiB, alias="EMBED_MAX_IMAGE_BYTES", ge=1, description="decoded image payload")
    max_image_short_side: int = Field(8192, alias="EMBED_MAX_IMAGE_SHORT_SIDE", ge=1,
                                      description="pixels, either orientation")
    max_image_long_side: int = Field(16384, alias="EMBED_MAX_IMAGE_LONG_SIDE", ge=1,
                                     description="pixels, either orientation")

    # ---- batching and time limits ----------------------------------------------------------------------------
    max_wait_ms: int = Field(10, alias="NIM_MAX_WAIT_MS", ge=0,
                             description="longest a request is held for a batch to fill, while traffic flows (an "
                                         "idle server never holds one)")
    health_port: int | None = Field(None, alias="EMBED_HEALTH_PORT", ge=1, le=65535,
                                    description="also answer /v1/health/live and /ready on this port, from a process "
                                                "of their own that never waits behind request work (for cluster "
                                                "probes)")
    workers: int = Field(1, alias="EMBED_WORKERS", ge=1,
                         description="server processes, each with its own copy of the model and its own batches")
    request_timeout_s: float = Field(300.0, alias="NIM_REQUEST_TIMEOUT_S", gt=0, description="504 after this")
    decode_threads: int = Field(4, alias="EMBED_DECODE_THREADS", ge=1,
                                description="host threads for image decoding, tiling and collation")

    # ---- the engine: forward-pass buckets (every one is compiled before ready) -------------------------------
    max_batch_tokens: int | None = Field(None, alias="EMBED_MAX_BATCH_TOKENS", ge=16,
                                         description="padded tokens per forward pass; default 65536 GPU, 8192 CPU")
    max_rows: int | None = Field(None, alias="EMBED_MAX_ROWS", ge=1,
                                 description="inputs per forward pass; default 128 GPU, 64 CPU")
    max_tiles_per_pass: int | None = Field(None, alias="EMBED_MAX_TILES_PER_PASS", ge=1,
                                           description="image tiles per vision pass; default 32 GPU, 8 CPU")
    compilation_cache: str | None = Field(None, alias="EMBED_COMPILATION_CACHE",
                                          description="persistent XLA cache directory; default $EMBED_CACHE_DIR/xla")
    ready_early: bool = Field(False, alias="EMBED_READY_EARLY",
                              description="ready once one input alone of any size can run; the other buckets "
                                          "compile in the background (a batch needing one first compiles it)")
    gpu_memory_fraction: float | None = Field(None, alias="EMBED_GPU_MEMORY_FRACTION", gt=0, le=1,
                                              description="share of GPU memory each worker preallocates "
                                                          "(JAX's default 0.75 with one worker, 0.85/workers with "
                                                          "several; lower it to share a GPU)")
    startup_delay_s: float = Field(0.0, alias="EMBED_STARTUP_DELAY_S", ge=0,
                                   description="sleep before loading the model (to test readiness probes)")

    # ---- admission control: work in flight per worker (queued or computing), beyond which requests get 429 ------
    max_inflight_inputs: int | None = Field(None, alias="EMBED_MAX_INFLIGHT_INPUTS", ge=1,
                                            description="inputs in flight; default 16 forward passes' rows")
    max_inflight_tokens: int | None = Field(None, alias="EMBED_MAX_INFLIGHT_TOKENS", ge=1,
                                            description="tokens in flight; default 16 forward passes' token budget")
    retry_after_s: int = Field(1, alias="EMBED_RETRY_AFTER_S", ge=1, description="Retry-After of a 429")
    shed_lag_ms: float = Field(10.0, alias="EMBED_SHED_LAG_MS", ge=0,
                               description="429 for new requests while the worker's event loop runs this late "
                                           "(and it holds two forward passes' tokens); 0: never")

    # ---- security and access --------------------------------------------------------------------------------
    api_keys: str | None = Field(None, alias="EMBED_API_KEYS", repr=False,
                                 description="comma-separated keys; set (or a file) to require Bearer auth")
    api_keys_file: str | None = Field(None, alias="EMBED_API_KEYS_FILE",
                                      description="file of keys, one a line (# comments); reread at start only")
    public_paths: str = Field("/v1/health/live,/v1/health/ready,/v1/metrics,/livez,/readyz,/healthz,/metrics",
                              alias="EMBED_PUBLIC_PATHS", description="comma-separated paths open without a key")
    cors_origins: str | None = Field(None, alias="EMBED_CORS_ORIGINS",
                                     description="comma-separated allowed origins (`*` for any); unset: no CORS")
    cors_headers: str = Field("authorization,content-type,x-request-id", alias="EMBED_CORS_HEADERS",
                              description="comma-separated request headers a browser may send")
    access_log: bool = Field(True, alias="EMBED_ACCESS_LOG", description="one JSON line per request on stdout")
    tracing: bool = Field(False, alias="EMBED_TRACING",
                          description="trace requests with BentoML's OpenTelemetry tracing (configure its exporter "
                                      "and sample rate in BentoML's configuration)")

    # ---- fault injection (tests and drills only) ------------------------------------------------------------
    fault_batch_delay_s: float = Field(0.0, alias="EMBED_FAULT_BATCH_DELAY_S", ge=0,
                                       description="sleep in every batch: makes slow requests for timeout, drain "
                                                   "and overload drills; never set it in production")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build from the environment; an empty variable counts as unset. Raises ValueError naming each bad one."""
        environ = os.environ if environ is None else environ
        names = {f.alias for f in cls.model_fields.values()}
        values = {k: v for k, v in environ.items() if k in names and v.strip() != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(f"{err['loc'][0]}={values.get(str(err['loc'][0]))!r}: {err['msg']}"
                                 for err in e.errors())
            raise ValueError(f"invalid service configuration: {problems}") from None

    def inflight_limits(self, max_rows: int, max_batch_tokens: int) -> tuple[int, int]:
        """(inputs, tokens) in flight per worker: the settings, else 16 of the engine's forward passes.

        Sixteen passes keep the device busy between batches while bounding the queue: at a pass's duration d a
        request waits at most ~16·d before its own pass starts, instead of piling up until it times out.
        """
        return (self.max_inflight_inputs or 16 * max_rows, self.max_inflight_tokens or 16 * max_batch_tokens)

    def keys(self) -> tuple[str, ...]:
        """API keys from EMBED_API_KEYS and EMBED_API_KEYS_FILE; empty: authentication is off."""
        found = [k for k in (self.api_keys or "").split(",")]
        if self.api_keys_file:
            try:
                lines = open(self.api_keys_file, encoding="utf-8").read().splitlines()
            except OSError as e:
                raise ValueError(f"EMBED_API_KEYS_FILE={self.api_keys_file!r} cannot be read: {e.strerror}") from None
            found += [line for line in lines if not line.lstrip().startswith("#")]
        keys = tuple(dict.fromkeys(k.strip() for k in found if k.strip()))
        if not keys and (self.api_keys is not None or self.api_keys_file):
            # Asked for authentication but given no key: refuse to start rather than serve everyone.
            raise ValueError("EMBED_API_KEYS / EMBED_API_KEYS_FILE are set but hold no key")
        return keys

    def public(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.public_paths.split(",") if p.strip())

    def longest_input(self) -> int:
        return max(self.max_tokens_text, self.max_tokens_image, self.max_tokens_text_image)

    def max_tokens(self, modality: str) -> int:
        return {"text": self.max_tokens_text, "image": self.max_tokens_image,
                "text_image": self.max_tokens_text_image}[modality]


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
