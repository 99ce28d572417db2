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
    POST /embed_batch         BentoML's batchable API that every embedding goes through (also for BentoML clients)

Every error is `{"object": "error", "message": ..., "type": ...}`. Configuration: environment variables, see
serving/settings.py. Batching: /v1/embeddings validates and tokenises each input, then hands it to `embed_batch`
through BentoML's adaptive batcher (called in process, see expose_batcher), so concurrent requests share forward
passes.
Overload, hostile input, faults and access control: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from conversion.resolve import cache_root
from engine import EngineConfig, configure_compilation_cache
from model import Embedder
from serving import info, openapi
from serving.access import ApiKeyAuth, RequestLog, annotate, cors_options
from serving.admission import Admission
from serving.encoding import check_dimensions, embeddings_body, encode_vector, gather_vectors
from serving.errors import GatewayTimeoutError, ServiceUnavailableError, TooManyRequestsError, from_batcher
from serving.handoff import Handed
from serving.http import NimErrorShape, discard_body, nim_app, read_body, unless_disconnected
from serving.inputs import PILLOW_FORMATS, limit_pillow_pixels
from serving.lifecycle import Background, stop_listening
from serving.metrics import get_metrics, render
from serving.preflight import preflight
from serving.prepare import complete_item, model_input_type, prepare_request
from serving.runner import Runner
from serving.schemas import BatchItem, BatchResult, EmbeddingRequest, ItemError, parse_embedding_request
from serving.settings import get_settings

try:
    SETTINGS = get_settings()
    API_KEYS = SETTINGS.keys()
except ValueError as e:  # a bad variable stops `bentoml serve` with one line, not a traceback
    raise SystemExit(f"FATAL: {e}") from None
preflight(SETTINGS.model)  # a missing or corrupt local checkpoint stops the server here, before any worker starts
T = TypeVar("T")
DISCARD_BYTES = 1 << 20  # bodies up to this size are read and dropped before a 429 (the connection stays usable)

# Request work (parsing, tokenising, encoding answers) has its own threads: on Starlette's shared pool it would queue
# ahead of BentoML's batch function, which runs there, and of the metrics. Probes use no thread at all.
REQUEST_POOL = ThreadPoolExecutor(max(4, SETTINGS.decode_threads), thread_name_prefix="request")
OPS_POOL = ThreadPoolExecutor(1, thread_name_prefix="ops")


async def offload(fn: Callable[..., T], *args, pool: ThreadPoolExecutor = REQUEST_POOL) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


# ---- /v1 routes -------------------------------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
    svc = service()
    svc.embedder()  # 503 until loaded and warmed up (or while draining), before anything is read
    try:
        svc.admission.check_room()  # 429 at once when this worker is full: the body is not parsed
    except TooManyRequestsError:
        await discard_body(request, DISCARD_BYTES)  # so that the client reads the 429, not a reset connection
        raise
    body = await read_body(request, SETTINGS.max_body_bytes)  # 413 over the limit, counted as it streams in
    req = await offload(parse_embedding_request, body)  # 400; off the event loop: bodies reach 128 MiB
    implied = model_input_type(req.model, SETTINGS.model_name)  # 404 for another model; "-query" -> "query"
    input_type = req.input_type or implied
    embedder = svc.embedder()
    check_dimensions(req.dimensions, req.embedding_type, embedder.config.embedding_size)
    annotate(request.scope, inputs=len(req.input))
    with svc.admission.admit(len(req.input)) as ticket:  # 429 over the inputs in flight
        async def work():
            prepared = await offload(prepare_request, req, input_type, embedder, SETTINGS)
            ticket.charge(sum(prepared.tokens))  # 429 over the tokens in flight
            annotate(request.scope, tokens=sum(prepared.tokens))
            return prepared, await svc.embed(prepared.items)

        try:
            async with asyncio.timeout(SETTINGS.request_timeout_s):
                # A client that hangs up is dropped here (499); its queued items are skipped by the batch function,
                # as are those of a request that timed out: the ticket is released either way.
                prepared, results = await unless_disconnected(request, work())
        except TimeoutError:
            raise GatewayTimeoutError(f"the request took longer than {SETTINGS.request_timeout_s:g} s") from None
    response = await offload(_respond, results, req, sum(prepared.tokens))  # 2048 vectors take a while
    get_metrics().observe_inputs(prepared.modalities, prepared.tokens)
    return response


def _respond(results: list[BatchResult], req: EmbeddingRequest, tokens: int) -> Response:
    vectors = gather_vectors(results)  # the first failed input fails the request (and only this request)
    return JSONResponse(embeddings_body(vectors, req, SETTINGS.model_name, tokens))


async def list_models(request: Request) -> Response:
    return JSONResponse(info.models(SETTINGS, service().started))


async def health_ready(request: Request) -> Response:
    svc = service()
    if svc.draining:  # SIGTERM: take this pod out of the load balancer while in-flight requests finish
        return JSONResponse(info.ready(False, "shutting down"), status_code=503)
    model = svc.model
    return JSONResponse(info.ready(model.ready, model.error), status_code=200 if model.ready else 503)


async def health_live(request: Request) -> Response:
    model = service().model
    return JSONResponse(info.live(not model.failed, model.error), status_code=503 if model.failed else 200)


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
    ("GET", openapi.PATH, openapi_json),
])


# ---- the BentoML service ----------------------------------------------------------------------------------------------
def bound_batch_fill_wait(max_wait_s: float) -> None:
    """Make NIM_MAX_WAIT_MS bound how long BentoML's batcher holds a lone request to fill a batch.

    BentoML 1.4's dispatcher has no such setting: it learns the hold from the queue waits it observed, which include
    waiting for the batch in flight. After a burst a lone request is then held for about a batch's duration, and the
    learned value decays by 5 % per 5-second refresh: minutes of inflated latency at low load. Capping the learned value
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


def release_timeout_timers() -> None:
    """Cancel the timer that BentoML's traffic timeout arms for every request once the request has answered.

    BentoML 1.4's TimeoutMiddleware calls `loop.call_later(timeout, ...)` per request and never cancels it. The timer
    holds the request's context (its tracing span, attributes, scope) until it fires, `traffic.timeout` seconds
    later: memory grows with the request rate times that timeout, which at a GPU's request rate is gigabytes
    (bench/soak.py's memory slope shows it). This is that method with the timer
    cancelled when its waiter resolves (bentoml is pinned to 1.4.40; tests/test_hardening_units.py checks that the
    upstream method still arms a timer it never cancels, and that with this one no timer outlives its request).
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse as BentoTimeoutResponse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)
        waiter.add_done_callback(lambda _: timer.cancel())  # the fix: nothing outlives the request

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                resp = BentoTimeoutResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
                await resp(scope, receive, send)
        else:
            await fut

    __call__.__wrapped__ = getattr(TimeoutMiddleware.__call__, "__wrapped__", TimeoutMiddleware.__call__)
    TimeoutMiddleware.__call__ = __call__


release_timeout_timers()


def cache_io_schemas() -> None:
    """Generate each BentoML IO model's JSON schema once, not on every call.

    BentoML 1.4 rebuilds the JSON schema of a method's input or output model on every call of its route, only to read
    its `type` (`IOMixin.mime_type` when answering, `IORootModel.model_json_schema` when a BentoML client parses the
    answer): milliseconds with the GIL held, per request, on the worker's busiest path. A model's schema is
    fixed once the service is defined, so the no-argument call is cached (a copy is returned: callers may edit it).
    bentoml is pinned to 1.4.40; tests/test_service_units.py checks the hook.
    """
    from _bentoml_sdk.io_models import IOMixin, IORootModel

    for owner in (IOMixin, IORootModel):  # list[...] outputs are IORootModels, with their own method
        method = owner.__dict__["model_json_schema"].__func__
        generate = getattr(method, "__wrapped__", method)
        owner.model_json_schema = classmethod(_cached_schema(generate))  # type: ignore[method-assign]


def _cached_schema(generate: Callable[..., dict]) -> Callable[..., dict]:
    schemas: dict[type, dict] = {}

    @functools.wraps(generate)
    def model_json_schema(cls, *args, **kwargs) -> dict:
        if args or kwargs:
            return generate(cls, *args, **kwargs)
        if cls not in schemas:
            schemas[cls] = generate(cls)
        return copy.deepcopy(schemas[cls])

    return model_json_schema


cache_io_schemas()


def expose_batcher() -> None:
    """Give each service instance BentoML's own batcher for its batchable methods, in process.

    BentoML 1.4 lets a service reach its own batchable method only through `self.to_async`: an HTTP request over an
    in-memory ASGI transport, through every middleware, with the inputs and the answers as JSON both ways. Under load
    that loopback took more of a request's time than the model (bench/server.py). The batcher behind the route (one
    adaptive CorkDispatcher per worker and method, the same one that serves BentoML clients calling /embed_batch) is
    `ServiceAppFactory.batch_infer`: this hands it to the instance as `batch_infer(name, args, kwargs)` once the
    instance exists. bentoml is pinned to 1.4.40; tests/test_service_units.py checks the hook.
    """
    from _bentoml_impl.server.app import ServiceAppFactory

    create = getattr(ServiceAppFactory.create_instance, "__wrapped__", ServiceAppFactory.create_instance)

    @functools.wraps(create)
    async def create_instance(self, app) -> None:
        await create(self, app)
        self._service_instance.batch_infer = self.batch_infer

    ServiceAppFactory.create_instance = create_instance


expose_batcher()


@bentoml.asgi_app(API, path="/")
@bentoml.service(
    name="nemotron-embed-vl",
    # Our own 504 (NIM_REQUEST_TIMEOUT_S) fires first; BentoML's traffic timeout is only a backstop.
    traffic={"timeout": SETTINGS.request_timeout_s + 30},
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
        self.draining = False
        self.model = Background(self._load, delay_s=SETTINGS.startup_delay_s).start()

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
        return Admission(max_inputs, max_tokens, retry_after_s=SETTINGS.retry_after_s, on_shed=metrics.on_shed,
                         on_change=metrics.on_inflight)

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
        if required and self.draining:
            raise ServiceUnavailableError("the server is shutting down; retry on another replica", retry_after_s=1)
        if runner is None and required:
            if self.model.failed:
                raise ServiceUnavailableError("the model failed to load; see the server log", retry_after_s=60)
            raise ServiceUnavailableError("the model is loading; retry later", retry_after_s=5)
        return runner.embedder if runner is not None else None

    async def embed(self, items: list[BatchItem]) -> list[BatchResult]:
        """Through BentoML's adaptive batcher for `embed_batch`, shared with every concurrent request (and BentoML
        clients). The inputs wait in this worker's handoff (images start decoding now, while the batch in flight
        runs); only their keys go through the batcher."""
        runner = self.model.value
        keys = [runner.hand_over(item.token_ids, item.image) for item in items]
        depth = get_metrics().queue_depth
        depth.inc(len(items))
        try:
            return await self.batch_infer("embed_batch", ([BatchItem(handoff=key) for key in keys],), {})
        except BentoMLException as e:
            raise from_batcher(int(e.error_code)) from None
        except Exception:
            logging.getLogger("serving").exception("embed_batch failed")
            raise from_batcher(500) from None
        finally:
            depth.dec(len(items))
            runner.handoff.discard(keys)  # over, however it ended: what its batch has not taken is dropped

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def embed_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """Embed the inputs /v1/embeddings handed over (or raw text/image items from a BentoML client), one result
        per item."""
        runner = self.model.value
        if runner is None:
            return [BatchResult(error=ItemError(status=503, message="the model is not ready"))] * len(items)
        if SETTINGS.fault_batch_delay_s:  # drills only: a slow device
            time.sleep(SETTINGS.fault_batch_delay_s)
        # Inputs whose request is over (client gone, timed out) are no longer in the handoff: they never reach the
        # device.
        inputs = [_take(item, runner) for item in items]
        if (abandoned := sum(1 for x in inputs if x is ABANDONED)):
            get_metrics().abandoned_inputs.inc(abandoned)
        todo = [x for x in inputs if isinstance(x, Handed)]
        get_metrics().observe_batch_start([x.submitted_at for x in todo], sum(len(x.token_ids) for x in todo))
        start = time.perf_counter()
        outputs = iter(runner.run(todo))
        get_metrics().inference_seconds.observe(time.perf_counter() - start)
        return [_result(x, next(outputs)) if isinstance(x, Handed) else BatchResult(error=x) for x in inputs]


ABANDONED = ItemError(status=499, message="the request is over")


def _take(item: BatchItem, runner: Runner) -> Handed | ItemError:
    if item.handoff is not None:
        return runner.handoff.take(item.handoff) or ABANDONED
    try:
        item = complete_item(item, runner.embedder, SETTINGS)
    except ValueError as e:
        return ItemError(status=400, message=str(e))
    return runner.handed(item.token_ids or [], item.image)  # sent to the batch directly: never in the handoff


def _result(handed: Handed, output: np.ndarray | ItemError) -> BatchResult:
    tokens = len(handed.token_ids)
    if isinstance(output, ItemError):
        return BatchResult(tokens=tokens, error=output)
    return BatchResult(tokens=tokens, embedding=encode_vector(output))


# Outermost first. Every route passes them, BentoML's own included.
NemotronEmbed.add_asgi_middleware(RequestLog, enabled=SETTINGS.access_log)  # x-request-id, JSON access log
NemotronEmbed.add_asgi_middleware(NimErrorShape)  # every error below in the NIM shape (BentoML's, CORS refusals)
if SETTINGS.cors_origins:
    NemotronEmbed.add_asgi_middleware(CORSMiddleware, **cors_options(SETTINGS.cors_origins, SETTINGS.cors_headers))
if API_KEYS:
    NemotronEmbed.add_asgi_middleware(ApiKeyAuth, keys=API_KEYS, public=SETTINGS.public())
NemotronEmbed.add_asgi_middleware(openapi.MergeIntoBentoDocs, document=OPENAPI)  # /docs.json shows the /v1 routes


def service() -> NemotronEmbed:
    """This worker's service instance (BentoML creates it before serving any request)."""
    return bentoml.get_current_service()

