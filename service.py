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
    GET  /v1/openapi.json     OpenAPI of these routes (also merged into BentoML's /docs.json)
    POST /embed_batch         the same model for BentoML's Python clients (token ids or text, images as base64)

Every error is `{"object": "error", "message": ..., "type": ...}`. Configuration: environment variables, see
serving/settings.py. Each request is validated and tokenised here, then queued for the engine's batch thread
(engine/queue.py), which packs the inputs of every concurrent request into shared forward passes; admission control
(serving/admission.py) bounds what each worker holds and answers the excess with 429 before reading its body.
Overload, hostile input, faults and access control: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import bentoml
import numpy as np
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from conversion.resolve import cache_root
from engine import EngineConfig, configure_compilation_cache
from model import Embedder
from serving import bentoml_compat, info, openapi
from serving.access import ApiKeyAuth, RequestLog, annotate, cors_options
from serving.admission import Admission
from serving.encoding import check_dimensions, embeddings_json, encode
from serving.errors import GatewayTimeoutError, NimError, ServiceUnavailableError, TooManyRequestsError, for_status
from serving.http import NimErrorShape, NimRoutes, discard_body, error_response, nim_app, read_body, unless_disconnected
from serving.health_port import serve_probes
from serving.inputs import PILLOW_FORMATS, limit_pillow_pixels
from serving.lifecycle import Background, stop_listening
from serving.metrics import get_metrics, render
from serving.preflight import preflight, preflight_download
from serving.prepare import ModelInput, complete_item, model_input_type, prepare_request
from serving.runner import Runner
from serving.schemas import BatchItem, BatchResult, ItemError, parse_embedding_request
from serving.settings import get_settings

try:
    SETTINGS = get_settings()
    API_KEYS = SETTINGS.keys()
except ValueError as e:  # a bad variable stops `bentoml serve` with one line, not a traceback
    raise SystemExit(f"FATAL: {e}") from None
preflight(SETTINGS.model)  # a missing or corrupt local checkpoint stops the server here, before any worker starts
bentoml_compat.check()  # the one module that reaches into BentoML's internals says here if this version differs
T = TypeVar("T")
DISCARD_BYTES = 1 << 20  # bodies up to this size are read and dropped before a 429 (the connection stays usable)
# A request this small (a few queries) is parsed, tokenised and answered on the event loop: a thread hand-off would
# cost more than the work. Larger ones (passages in bulk, page images) go to the request threads, and so does every
# request while the worker already holds many: a burst then waits on threads, not in the loop's queue, and the loop
# keeps answering probes and shedding load.
INLINE_BYTES = 8 * 1024
INLINE_INPUTS = 8
INLINE_MAX_REQUESTS = 32

# Request work has its own threads, apart from Starlette's shared pool. Probes use no thread at all.
REQUEST_POOL = ThreadPoolExecutor(max(4, SETTINGS.decode_threads), thread_name_prefix="request")
OPS_POOL = ThreadPoolExecutor(1, thread_name_prefix="ops")


async def offload(fn: Callable[..., T], *args, pool: ThreadPoolExecutor = REQUEST_POOL) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


# ---- /v1 routes -------------------------------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
    svc = service()
    runner = svc.runner()  # 503 until loaded and warmed up (or while draining), before anything is read
    try:
        ticket = svc.admission.enter()  # 429 at once when this worker is full: the body is not read
    except TooManyRequestsError:
        await discard_body(request, DISCARD_BYTES)  # so that the client reads the 429, not a reset connection
        raise
    with ticket:  # released however the request ends
        body = await read_body(request, SETTINGS.max_body_bytes)  # 413 over the limit, counted as it streams in
        small = len(body) <= INLINE_BYTES and svc.admission.requests <= INLINE_MAX_REQUESTS  # this one included
        req = parse_embedding_request(body) if small else await offload(parse_embedding_request, body)  # 400
        implied = model_input_type(req.model, SETTINGS.model_name)  # 404 for another model; "-query" -> "query"
        input_type = req.input_type or implied
        embedder = runner.embedder
        check_dimensions(req.dimensions, req.embedding_type, embedder.config.embedding_size)
        inline = small and len(req.input) <= INLINE_INPUTS
        annotate(request.scope, inputs=len(req.input))
        ticket.admit(len(req.input))  # 429 over the inputs in flight
        prepared = prepare_request(req, input_type, embedder, SETTINGS) if inline else \
            await offload(prepare_request, req, input_type, embedder, SETTINGS)
        tokens = sum(prepared.tokens)
        ticket.charge(tokens)  # 429 over the tokens in flight
        annotate(request.scope, tokens=tokens)
        try:
            async with asyncio.timeout(SETTINGS.request_timeout_s):
                # A client that hangs up is dropped here (499), as is a request that timed out: inputs that no batch
                # has started are withdrawn, and the ticket is released either way.
                results = await unless_disconnected(request, runner.embed(prepared.inputs))
        except TimeoutError:
            raise GatewayTimeoutError(f"the request took longer than {SETTINGS.request_timeout_s:g} s") from None
    vectors = gather(results)  # the first failed input fails the request (and only this request)
    content = embeddings_json(vectors, req, SETTINGS.model_name, tokens) if len(vectors) <= INLINE_INPUTS else \
        await offload(embeddings_json, vectors, req, SETTINGS.model_name, tokens)  # 2048 vectors take a while
    get_metrics().observe_inputs(prepared.modalities, prepared.tokens)
    return Response(content, media_type="application/json")


def gather(results: list[np.ndarray | ItemError]) -> np.ndarray:
    for i, result in enumerate(results):
        if isinstance(result, ItemError):
            raise for_status(result.status, f"input[{i}]: {result.message}")
    return np.stack(results)


async def list_models(request: Request) -> Response:
    return JSONResponse(info.models(SETTINGS, service().started))


async def health_ready(request: Request) -> Response:
    status, body = service().readiness()
    return JSONResponse(body, status_code=status)


async def health_live(request: Request) -> Response:
    status, body = service().liveness()
    return JSONResponse(body, status_code=status)


async def prometheus_metrics(request: Request) -> Response:
    content, media_type = await offload(render, pool=OPS_POOL)  # never queued behind request work
    return Response(content, media_type=media_type)


async def metadata(request: Request) -> Response:
    return JSONResponse(info.metadata(SETTINGS, service().embedder(required=False)))


async def manifest(request: Request) -> Response:
    return JSONResponse(info.manifest(SETTINGS, service().embedder()))


async def license_(request: Request) -> Response:
    return JSONResponse(info.license_info(service().embedder(required=False)))


async def version(request: Request) -> Response:
    return JSONResponse(info.version())


OPENAPI = openapi.document(auth=bool(API_KEYS))


async def openapi_json(request: Request) -> Response:
    return JSONResponse(OPENAPI)


ROUTES = [
    ("POST", "/v1/embeddings", embeddings),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/health/ready", health_ready),
    ("GET", "/v1/health/live", health_live),
    ("GET", "/v1/metrics", prometheus_metrics),
    ("GET", "/v1/metadata", metadata),
    ("GET", "/v1/manifest", manifest),
    ("GET", "/v1/license", license_),
    ("GET", "/v1/version", version),
    ("GET", openapi.PATH, openapi_json),
]
API = nim_app(ROUTES)  # mounted: answers what NimRoutes passes on (405, 404) in the NIM shape


# ---- the BentoML service ----------------------------------------------------------------------------------------------
@bentoml.asgi_app(API, path="/")
@bentoml.service(
    name="nemotron-embed-vl",
    workers=SETTINGS.workers,
    # Our own 504 (NIM_REQUEST_TIMEOUT_S) fires first; BentoML's traffic timeout is only a backstop.
    traffic={"timeout": SETTINGS.request_timeout_s + 30},
    endpoints={"livez": "/v1/health/live", "readyz": "/v1/health/ready"},
    # /v1/metrics and our JSON access log (serving/access.py) say everything these said, once: BentoML's own
    # per-request metrics and access lines would double the cost of a short request and log each request twice.
    metrics={"enabled": False},
    logging={"access": {"enabled": False}},
    # BentoML's OpenTelemetry middleware makes a span per request even when nothing samples or exports it; unless
    # EMBED_TRACING asks for traces, every path is excluded and requests pass it untouched.
    tracing={} if SETTINGS.tracing else {"excluded_urls": [".*"]},
)
class NemotronEmbed:
    def __init__(self) -> None:
        global _instance
        _instance = self
        logging.getLogger("serving").setLevel(logging.INFO)  # BentoML leaves non-bentoml loggers at WARNING
        limit_pillow_pixels(SETTINGS.max_image_short_side, SETTINGS.max_image_long_side)
        self.started = int(time.time())
        fraction = SETTINGS.gpu_memory_fraction
        if fraction is None and SETTINGS.workers > 1:  # every worker holds a model: share the GPU, JAX would take 75 %
            fraction = round(0.85 / SETTINGS.workers, 3)
        if fraction:  # before JAX starts its backend, in the model's loading thread
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(fraction)
        get_metrics()  # registers the series (and the JAX compilation listener) before the warm-up compiles
        self.draining = False
        self.model = Background(self._load, delay_s=SETTINGS.startup_delay_s).start()
        if SETTINGS.health_port:  # probes that never wait behind request work (serving/health_port.py)
            serve_probes(SETTINGS.health_port, {"/v1/health/live": self.liveness, "/v1/health/ready": self.readiness})

    @bentoml.on_deployment
    def _check_model() -> None:  # `bentoml serve`'s parent process, before any worker (not `bentoml build`)
        preflight_download(SETTINGS.model, SETTINGS.model_revision)

    @bentoml.on_startup
    def _drain_on_sigterm(self) -> None:
        """On SIGTERM uvicorn waits for the requests in flight, then exits. This adds that new connections are
        refused at once (see stop_listening) and that requests on connections already open get 503 (ready too), so
        clients and load balancers fail over while the work in flight completes. Runs inside uvicorn's serve(),
        after it installed its own handler, which is chained."""
        if threading.current_thread() is not threading.main_thread():
            return  # in-process (`TestClient(NemotronEmbed.to_asgi())`): no signals to take, as for uvicorn itself
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame) -> None:
            self.draining = True
            closed = stop_listening()  # new connections are refused, not left hanging in the backlog
            in_flight = self.__dict__["admission"].requests if "admission" in self.__dict__ else 0
            logging.getLogger("serving").info("SIGTERM: stopped listening on %d socket(s); draining %d request(s)",
                                              closed, in_flight)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    @functools.cached_property
    def admission(self) -> Admission:
        """This worker's admission control, sized from the engine's forward-pass budget (needs the model)."""
        config = self.model.value.engine.config
        max_inputs, max_tokens = SETTINGS.inflight_limits(config.max_rows, config.max_batch_tokens)
        metrics = get_metrics()
        return Admission(max_inputs, max_tokens, retry_after_s=SETTINGS.retry_after_s,
                         max_lag_s=SETTINGS.shed_lag_ms / 1000, busy_floor=2 * config.max_batch_tokens,
                         on_shed=metrics.on_shed, on_change=metrics.on_inflight)

    @staticmethod
    def _load() -> Runner:
        start = time.perf_counter()
        configure_compilation_cache(SETTINGS.compilation_cache or str(cache_root() / "xla"))
        embedder = Embedder.from_pretrained(SETTINGS.model, dtype=SETTINGS.dtype, revision=SETTINGS.model_revision,
                                            max_tiles=SETTINGS.max_tiles, attention_implementation=SETTINGS.attention)
        config = EngineConfig.for_backend(
            max_length=SETTINGS.longest_input(), max_batch_tokens=SETTINGS.max_batch_tokens,
            max_rows=SETTINGS.max_rows, max_tiles=SETTINGS.max_tiles_per_pass,
            host_threads=SETTINGS.decode_threads, image_formats=PILLOW_FORMATS, ready_early=SETTINGS.ready_early)
        metrics = get_metrics()
        runner = Runner(embedder, config, observer=metrics, max_wait_s=SETTINGS.max_wait_ms / 1000,
                        fault_batch_delay_s=SETTINGS.fault_batch_delay_s)
        # Every bucket compiles before ready (EMBED_READY_EARLY: those of one input alone, the rest in the background):
        # compile time inside a batch would stall every request behind it.
        warmup = runner.warmup()
        # The model, JAX and the compiled programs leave ~10^6 Python objects that live as long as the process; a full
        # collection walks them all (hundreds of ms on a CPU, a stall for every request in flight). Frozen, they are
        # left out of every collection.
        gc.collect()
        gc.freeze()
        startup = time.perf_counter() - start
        metrics.mark_ready(startup, warmup)
        logging.getLogger("serving").info(
            "ready: %s (%s) loaded in %.1fs, %d buckets compiled in %.1fs", SETTINGS.model, embedder.dtype,
            startup - warmup, runner.engine.stats.compilations, warmup)
        return runner

    def readiness(self) -> tuple[int, dict]:
        if self.draining:  # SIGTERM: take this pod out of the load balancer while in-flight requests finish
            return 503, info.ready(False, "shutting down")
        return (200 if self.model.ready else 503), info.ready(self.model.ready, self.model.error)

    def liveness(self) -> tuple[int, dict]:
        return (503 if self.model.failed else 200), info.live(not self.model.failed, self.model.error)

    def __is_ready__(self) -> bool:  # BentoML's /readyz agrees with /v1/health/ready
        return self.model.ready

    def __is_alive__(self) -> bool:
        return not self.model.failed

    def runner(self) -> Runner:
        """The loaded model; 503 while it loads, after it failed, or while draining."""
        runner = self.model.value
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down; retry on another replica", retry_after_s=1)
        if runner is None:
            if self.model.failed:
                raise ServiceUnavailableError("the model failed to load; see the server log", retry_after_s=60)
            raise ServiceUnavailableError("the model is loading; retry later", retry_after_s=5)
        return runner

    def embedder(self, required: bool = True) -> Embedder | None:
        if required:
            return self.runner().embedder
        runner = self.model.value
        return runner.embedder if runner is not None else None

    @bentoml.api
    async def embed_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """Embed token ids, or text / an image (base64) with an input_type, for BentoML's Python clients: one result
        per item, a vector (base64 of little-endian float32, L2-normalised) or that item's own error. The same
        admission control, queue and engine as /v1/embeddings."""
        try:
            return await self._embed_items(items)
        except NimError as e:  # passed through as the NIM error (BentoML would hide a 503's message)
            return error_response(e)  # type: ignore[return-value]

    async def _embed_items(self, items: list[BatchItem]) -> list[BatchResult]:
        runner = self.runner()
        with self.admission.enter() as ticket:
            ticket.admit(max(len(items), 1))
            inputs: list[ModelInput | ItemError] = []
            for item in items:
                try:
                    inputs.append(complete_item(item, runner.embedder, SETTINGS))
                except ValueError as e:
                    inputs.append(ItemError(status=400, message=str(e)))
            valid = [x for x in inputs if not isinstance(x, ItemError)]
            ticket.charge(sum(len(ids) for ids, _ in valid))
            try:
                async with asyncio.timeout(SETTINGS.request_timeout_s):
                    outputs = iter(await runner.embed(valid))
            except TimeoutError:
                raise GatewayTimeoutError(f"the request took longer than {SETTINGS.request_timeout_s:g} s") from None
        results = []
        for x in inputs:
            if isinstance(x, ItemError):
                results.append(BatchResult(error=x))
                continue
            output = next(outputs)
            if isinstance(output, ItemError):
                results.append(BatchResult(tokens=len(x[0]), error=output))
            else:
                results.append(BatchResult(tokens=len(x[0]), embedding=encode(np.asarray(output, "<f4"), "base64")))
        return results


# Outermost first. Every route passes them, BentoML's own included.
NemotronEmbed.add_asgi_middleware(RequestLog, enabled=SETTINGS.access_log)  # x-request-id, JSON access log
NemotronEmbed.add_asgi_middleware(NimErrorShape)  # every error below in the NIM shape (BentoML's, CORS refusals)
if SETTINGS.cors_origins:
    NemotronEmbed.add_asgi_middleware(CORSMiddleware, **cors_options(SETTINGS.cors_origins, SETTINGS.cors_headers))
if API_KEYS:
    NemotronEmbed.add_asgi_middleware(ApiKeyAuth, keys=API_KEYS, public=SETTINGS.public())
NemotronEmbed.add_asgi_middleware(NimRoutes, routes=ROUTES)  # the /v1 routes, ahead of BentoML's context and router
NemotronEmbed.add_asgi_middleware(openapi.MergeIntoBentoDocs, document=OPENAPI)  # /docs.json shows the /v1 routes


_instance: NemotronEmbed | None = None


def service() -> NemotronEmbed:
    """This worker's service instance (BentoML creates it before serving any request; looked up once)."""
    return _instance or bentoml.get_current_service()
