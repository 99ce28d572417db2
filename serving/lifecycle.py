"""Load and warm the model on a background thread, so that the server answers probes while it loads:
live 200 and ready 503 until the warm-up has compiled, then ready 200; live 503 if loading failed.
(Loading inside the worker's start-up hooks would keep the socket bound but silent: probes would hang, not fail.)

And at the end of a worker's life, `stop_listening` makes a SIGTERM refuse new connections while it drains.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Generic, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, load: Callable[[], T], *, delay_s: float = 0.0, name: str = "model"):
        self._load, self._delay_s, self.name = load, delay_s, name
        self.value: T | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"load-{name}", daemon=True)

    def start(self) -> Background[T]:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.value is not None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.ready

    def _run(self) -> None:
        start = time.monotonic()
        try:
            if self._delay_s:
                time.sleep(self._delay_s)
            value = self._load()
        except Exception as e:  # noqa: BLE001 - reported through the health probes and the log
            self.error = f"{self.name} failed to load: {type(e).__name__}: {e}"
            # The line that says what failed and what to do comes first; a failure that explains itself (no model
            # to load) keeps its traceback for debug logging, anything else gets it after that line.
            explained = isinstance(e, _explained())
            logger.error("%s", self.error, exc_info=not explained)
            if explained:
                logger.debug("loading the %s failed", self.name, exc_info=True)
            return
        self.value = value
        logger.info("%s loaded and warmed up in %.1f s", self.name, time.monotonic() - start)


def _explained() -> tuple[type[Exception], ...]:
    from conversion.resolve import ModelNotFoundError
    from serving.preflight import CheckpointError

    return ModelNotFoundError, CheckpointError


def stop_listening() -> int:
    """Stop accepting connections on every listening socket of this process, for every process sharing it.

    On SIGTERM uvicorn closes its own descriptor of the socket, but BentoML's supervisor holds another one while it
    waits for its workers to drain: the kernel would keep accepting connections that nobody serves, and clients
    would hang instead of failing over. `shutdown()` on a listening socket un-listens the socket itself, so new
    connections are refused at once. Returns how many sockets were shut.
    """
    shut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket, or already closed
            continue
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RDWR)
                shut += 1
        except OSError:
            pass
        finally:
            sock.close()
    return shut
