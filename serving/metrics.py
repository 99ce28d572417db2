"""Prometheus metrics for /v1/metrics.

`bentoml serve` runs its workers with PROMETHEUS_MULTIPROC_DIR set, so every process writes its samples to files and
/v1/metrics reads them all back with a MultiProcessCollector (BentoML's own `bentoml_service_*` series included).
prometheus_client picks its storage when it is first imported, hence the imports inside functions: the parent
`bentoml serve` process imports this module before that variable exists.
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX records one per XLA compilation


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        powers = lambda top: tuple(float(1 << k) for k in range(top.bit_length() + 1))  # noqa: E731
        self.requests = Counter("nim_requests_total", "HTTP requests by route and status", ["route", "status"])
        self.request_seconds = Histogram("nim_request_duration_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS)
        self.queue_seconds = Histogram("nim_queue_duration_seconds", "Wait of a request from its submission to the "
                                       "start of its batch",
                                       buckets=LATENCY_BUCKETS)
        self.inference_seconds = Histogram("nim_inference_duration_seconds", "Duration of one batch (decode + forward)",
                                           buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("nim_batch_size", "Inputs per batch", buckets=powers(4096))
        self.batch_tokens = Histogram("nim_batch_tokens", "Tokens per batch", buckets=powers(1 << 20))
        self.inputs = Counter("nim_inputs_total", "Inputs embedded, by modality", ["modality"])
        self.input_tokens = Counter("nim_input_tokens_total", "Tokens embedded, by modality", ["modality"])
        self.queue_depth = Gauge("nim_queue_depth", "Inputs waiting for or inside a batch", multiprocess_mode="livesum")
        self.compilations = Counter("nim_compilations_total", "XLA compilations (every bucket compiles during warm-up)")
        self.compilations_after_ready = Counter(
            "nim_compilations_after_ready_total", "XLA compilations after /v1/health/ready said ready (should stay 0)")
        self.passes = Counter("nim_forward_passes_total", "Forward passes, by kind (text, multimodal)", ["kind"])
        self.pass_inputs = Histogram("nim_forward_pass_inputs", "Inputs per forward pass", buckets=powers(1024))
        self.real_tokens = Counter("nim_forward_real_tokens_total", "Tokens of real inputs in forward passes")
        self.computed_tokens = Counter("nim_forward_computed_tokens_total",
                                       "Tokens computed in forward passes, padding included (real/computed = "
                                       "padding efficiency)")
        self.pass_retries = Counter("nim_forward_pass_retries_total", "Forward passes that failed (device error, "
                                    "out of memory) and were retried in halves")
        self.shed = Counter("nim_shed_requests_total", "Requests refused with 429 by admission control, by the limit "
                            "hit (full: refused before reading the body; busy: the event loop ran late)", ["reason"])
        self.abandoned_inputs = Counter("nim_abandoned_inputs_total",
                                        "Inputs withdrawn before their batch because their request was over (client "
                                        "gone, timed out): the device never saw them")
        self.inflight_inputs = Gauge("nim_inflight_inputs", "Inputs admitted and not yet answered",
                                     multiprocess_mode="livesum")
        self.inflight_tokens = Gauge("nim_inflight_tokens", "Tokens admitted and not yet answered",
                                     multiprocess_mode="livesum")
        self.startup_seconds = Gauge("nim_startup_seconds", "Model load, conversion and warm-up, in seconds",
                                     multiprocess_mode="max")
        self.warmup_seconds = Gauge("nim_warmup_seconds", "Compiling every bucket before ready, in seconds",
                                    multiprocess_mode="max")
        self.ready = False
        self._children: dict[tuple, object] = {}
        self.compile_seconds = Histogram("nim_compile_duration_seconds", "XLA compilation time",
                                         buckets=LATENCY_BUCKETS)
        self._listen_to_compilations()

    def _listen_to_compilations(self) -> None:
        import jax.monitoring

        def on_event(event: str, duration: float, **_: object) -> None:
            if event == COMPILE_EVENT:
                self.compilations.inc()
                self.compile_seconds.observe(duration)
                if self.ready:
                    self.compilations_after_ready.inc()

        jax.monitoring.register_event_duration_secs_listener(on_event)

    def mark_ready(self, startup_s: float, warmup_s: float) -> None:
        self.startup_seconds.set(startup_s)
        self.warmup_seconds.set(warmup_s)
        self.ready = True

    # The engine's observer (engine.engine.Observer).
    def on_compile(self, kind: str, seconds: float, after_ready: bool) -> None:
        pass  # counted from JAX's own events above, which also catch compilations outside the engine

    def on_pass(self, kind: str, rows: int, length: int, inputs: int, real_tokens: int, tiles: int,
                seconds: float) -> None:
        self.passes.labels(kind=kind).inc()
        self.pass_inputs.observe(inputs)
        self.real_tokens.inc(real_tokens)
        self.computed_tokens.inc(rows * length)

    def on_retry(self, inputs: int) -> None:
        self.pass_retries.inc()

    def on_shed(self, reason: str) -> None:
        self.shed.labels(reason=reason).inc()

    def on_inflight(self, inputs: int, tokens: int) -> None:
        self.inflight_inputs.set(inputs)
        self.inflight_tokens.set(tokens)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        count, latency = self._series(self.requests, route, str(status)), self._series(self.request_seconds, route)
        count.inc()
        latency.observe(seconds)

    def observe_inputs(self, modalities: Sequence[str], tokens: Sequence[int]) -> None:
        for modality, n in zip(modalities, tokens):
            self._series(self.inputs, modality).inc()
            self._series(self.input_tokens, modality).inc(n)

    def _series(self, metric, *labels: str):
        """`metric.labels(*labels)`, looked up once: prometheus_client validates the labels on every call."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*labels)
        return series

    # The batch queue's observer (engine.queue.QueueObserver).
    def on_depth(self, inputs: int) -> None:
        self.queue_depth.set(inputs)

    def on_withdrawn(self, inputs: int) -> None:
        self.abandoned_inputs.inc(inputs)

    def on_batch(self, queue_waits: Sequence[float], inputs: int, tokens: int, seconds: float) -> None:
        """One batch of the engine's queue: the wait of each request in it, its size and its duration."""
        self.batch_size.observe(inputs)
        self.batch_tokens.observe(tokens)
        self.inference_seconds.observe(seconds)
        for wait in queue_waits:
            self.queue_seconds.observe(wait)


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """The process's metrics, created on first use (prometheus_client refuses to register a name twice)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


def render() -> tuple[bytes, str]:
    """The exposition text of every process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
