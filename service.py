"""llama-nemotron-embed-vl-1b-v2 behind NVIDIA NIM's embedding API, served by BentoML.

    bentoml serve                 # from the repository root; http://localhost:3000 (--port to change)

    POST /v1/embeddings       embed text, images (data URLs) or both        -> embeddings
    GET  /v1/models           the served model                               -> list_models
    GET  /v1/health/ready     200 once the model is loaded and compiled      -> health_ready
    GET  /v1/health/live      200 while the process serves                   -> health_live
    GET  /v1/metrics          Prometheus metrics                             -> prometheus_metrics
    GET  /v1/metadata         runtime, model, limits and capabilities        -> metadata
    GET  /v1/manifest         what is being served (source, hashes, dtype)   -> manifest
    GET  /v1/license          licenses of the weights and of this software   -> license_
    GET  /v1/version          release and API version                        -> version
    POST /embed_batch         BentoML's batchable API that every embedding goes through (also for BentoML clients)

Every error is `{"object": "error", "message": ..., "type": ...}`. Configuration: environment variables, see
serving/settings.py. Batching: /v1/embeddings validates and tokenises each input, then calls `embed_batch` through
BentoML's adaptive batcher (an in-process self-call), so concurrent requests share forward passes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from conversion.resolve import cache_root
from engine import EngineConfig, configure_compilation_cache
from model import Embedder
from serving import info
from serving.encoding import check_dimensions, embeddings_body, encode_vector, gather_vectors
from serving.errors import GatewayTimeoutError, ServiceUnavailableError, from_batcher
from serving.http import NimErrorShape, nim_app, read_body
from serving.inputs import PILLOW_FORMATS, limit_pillow_pixels
from serving.lifecycle import Background
from serving.metrics import get_metrics, render
from serving.prepare import complete_item, model_input_type, prepare_request
from serving.runner import Runner
from serving.schemas import BatchItem, BatchResult, EmbeddingRequest, ItemError, parse_embedding_request
from serving.settings import get_settings

SETTINGS = get_settings()


# ---- /v1 routes -------------------------------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
    body = await read_body(request, SETTINGS.max_body_bytes)  # 413 over the limit
    req = await run_in_threadpool(parse_embedding_request, body)  # 400; off the event loop: bodies reach 128 MiB
    implied = model_input_type(req.model, SETTINGS.model_name)  # 404 for another model; "-query" -> "query"
    input_type = req.input_type or implied
    embedder = service().embedder()  # 503 until loaded and warmed up
    check_dimensions(req.dimensions, req.embedding_type, embedder.config.embedding_size)
    try:
        async with asyncio.timeout(SETTINGS.request_timeout_s):
            prepared = await run_in_threadpool(prepare_request, req, input_type, embedder, SETTINGS)
            results = await service().embed(prepared.items)
    except TimeoutError:
        raise GatewayTimeoutError(f"the request took longer than {SETTINGS.request_timeout_s:g} s") from None
    response = await run_in_threadpool(_respond, results, req, sum(prepared.tokens))  # 2048 vectors take a while
    get_metrics().observe_inputs(prepared.modalities, prepared.tokens)
    return response


def _respond(results: list[BatchResult], req: EmbeddingRequest, tokens: int) -> Response:
    vectors = gather_vectors(results)  # the first failed input fails the request (and only this request)
    return JSONResponse(embeddings_body(vectors, req, SETTINGS.model_name, tokens))


async def list_models(request: Request) -> Response:
    return JSONResponse(info.models(SETTINGS, service().started))


async def health_ready(request: Request) -> Response:
    model = service().model
    return JSONResponse(info.ready(model.ready, model.error), status_code=200 if model.ready else 503)


async def health_live(request: Request) -> Response:
    model = service().model
    return JSONResponse(info.live(not model.failed, model.error), status_code=503 if model.failed else 200)


async def prometheus_metrics(request: Request) -> Response:
    content, media_type = await run_in_threadpool(render)
    return Response(content, media_type=media_type)


async def metadata(request: Request) -> Response:
    return JSONResponse(info.metadata(SETTINGS, service().embedder(required=False)))


async def manifest(request: Request) -> Response:
    return JSONResponse(info.manifest(SETTINGS, service().embedder()))


async def license_(request: Request) -> Response:
    return JSONResponse(info.license_info(service().embedder(required=False)))


async def version(request: Request) -> Response:
    return JSONResponse(info.version())


API = nim_app([
    ("POST", "/v1/embeddings", embeddings),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/health/ready", health_ready),
    ("GET", "/v1/health/live", health_live),
    ("GET", "/v1/metrics", prometheus_metrics),
    ("GET", "/v1/metadata", metadata),
    ("GET", "/v1/manifest", manifest),
    ("GET", "/v1/license", license_),
    ("GET", "/v1/version", version),
])


# ---- the BentoML service ----------------------------------------------------------------------------------------------
def bound_batch_fill_wait(max_wait_s: float) -> None:
    """Make NIM_MAX_WAIT_MS bound how long BentoML's batcher holds a lone request to fill a batch.

    BentoML 1.4's dispatcher has no such setting: it learns the hold from the queue waits it observed, which include
    waiting for the batch in flight. After a burst a lone request is then held for about a batch's duration, and the
    learned value decays by 5 % per 5-second refresh: minutes of ~10x latency at low load. Capping the learned value
    (bentoml is pinned to 1.4.40; tests/test_service_units.py checks the hook still exists) keeps batching under load,
    where batches fill while one is in flight, and bounds the hold when idle, as NIM's own batcher does.
    """
    from bentoml._internal.marshal.dispatcher import Optimizer

    learn = getattr(Optimizer.trigger_refresh, "__wrapped__", Optimizer.trigger_refresh)

    @functools.wraps(learn)
    def trigger_refresh(self) -> None:
        learn(self)
        self.wait = min(self.wait, max_wait_s)

    Optimizer.trigger_refresh = trigger_refresh


bound_batch_fill_wait(SETTINGS.max_wait_ms / 1000)


@bentoml.asgi_app(API, path="/")
@bentoml.service(
    name="nemotron-embed-vl",
    # Our own 504 (NIM_REQUEST_TIMEOUT_S) fires first; BentoML's traffic timeout is only a backstop.
    traffic={"timeout": SETTINGS.request_timeout_s + 30},
    # Every embedding is a self-call: never recycle its client session under load (that drops in-flight calls).
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
    endpoints={"livez": "/v1/health/live", "readyz": "/v1/health/ready"},
)
class NemotronEmbed:
    def __init__(self) -> None:
        logging.getLogger("serving").setLevel(logging.INFO)  # BentoML leaves non-bentoml loggers at WARNING
        limit_pillow_pixels(SETTINGS.max_image_short_side, SETTINGS.max_image_long_side)
        self.started = int(time.time())
        if SETTINGS.gpu_memory_fraction:  # before JAX starts its backend, in the model's loading thread
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(SETTINGS.gpu_memory_fraction)
        get_metrics()  # registers the series (and the JAX compilation listener) before the warm-up compiles
        self.model = Background(self._load, delay_s=SETTINGS.startup_delay_s).start()

    @staticmethod
    def _load() -> Runner:
        start = time.perf_counter()
        configure_compilation_cache(SETTINGS.compilation_cache or str(cache_root() / "xla"))
        embedder = Embedder.from_pretrained(SETTINGS.model, dtype=SETTINGS.dtype, revision=SETTINGS.model_revision,
                                            max_tiles=SETTINGS.max_tiles)
        config = EngineConfig.for_backend(
            max_length=SETTINGS.longest_input(), max_batch_tokens=SETTINGS.max_batch_tokens,
            max_rows=SETTINGS.max_rows, max_tiles=SETTINGS.max_tiles_per_pass,
            host_threads=SETTINGS.decode_threads, image_formats=PILLOW_FORMATS)
        runner = Runner(embedder, config, observer=get_metrics())
        # Every bucket compiles before ready: compile time inside a batch would also skew the batcher's cost model.
        warmup = runner.warmup()
        startup = time.perf_counter() - start
        get_metrics().mark_ready(startup, warmup)
        logging.getLogger("serving").info(
            "ready: %s (%s) loaded in %.1fs, %d buckets compiled in %.1fs", SETTINGS.model, embedder.dtype,
            startup - warmup, runner.engine.stats.compilations, warmup)
        return runner

    def __is_ready__(self) -> bool:  # BentoML's /readyz agrees with /v1/health/ready
        return self.model.ready

    def __is_alive__(self) -> bool:
        return not self.model.failed

    def embedder(self, required: bool = True) -> Embedder | None:
        runner = self.model.value
        if runner is None and required:
            if self.model.failed:
                raise ServiceUnavailableError("the model failed to load; see the server log", retry_after_s=60)
            raise ServiceUnavailableError("the model is loading; retry later", retry_after_s=5)
        return runner.embedder if runner is not None else None

    async def embed(self, items: list[BatchItem]) -> list[BatchResult]:
        """Through BentoML's adaptive batcher, shared with every concurrent request."""
        now = time.time()
        stamped = [item.model_copy(update={"submitted_at": now}) for item in items]
        depth = get_metrics().queue_depth
        depth.inc(len(items))
        try:
            return await self.to_async.embed_batch(stamped)  # type: ignore[attr-defined]
        except BentoMLException as e:
            raise from_batcher(int(e.error_code)) from None
        finally:
            depth.dec(len(items))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def embed_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """Embed pre-tokenised items (or raw text/image items from a BentoML client), one result per item."""
        runner = self.model.value
        if runner is None:
            return [BatchResult(error=ItemError(status=503, message="the model is not ready"))] * len(items)
        completed = [_complete(item, runner.embedder) for item in items]
        todo = [item for item in completed if isinstance(item, BatchItem)]
        get_metrics().observe_batch_start([item.submitted_at for item in todo],
                                          sum(len(item.token_ids or ()) for item in todo))
        start = time.perf_counter()
        outputs = iter(runner.run(todo))
        get_metrics().inference_seconds.observe(time.perf_counter() - start)
        return [_result(item, next(outputs)) if isinstance(item, BatchItem) else BatchResult(error=item)
                for item in completed]


def _complete(item: BatchItem, embedder: Embedder) -> BatchItem | ItemError:
    try:
        return complete_item(item, embedder, SETTINGS)
    except ValueError as e:
        return ItemError(status=400, message=str(e))


def _result(item: BatchItem, output: np.ndarray | ItemError) -> BatchResult:
    tokens = len(item.token_ids or ())
    if isinstance(output, ItemError):
        return BatchResult(tokens=tokens, error=output)
    return BatchResult(tokens=tokens, embedding=encode_vector(output))


NemotronEmbed.add_asgi_middleware(NimErrorShape)  # BentoML's own routes answer in the NIM shape too


def service() -> NemotronEmbed:
    """This worker's service instance (BentoML creates it before serving any request)."""
    return bentoml.get_current_service()

