"""Admission control: how much work one worker holds at once, counted in inputs and tokens, not HTTP requests.

A request is admitted in three steps, each refused with 429 and Retry-After in well under a millisecond:

    ticket = enter()      before the body is read: nothing is parsed while the worker is already full
    ticket.admit(inputs)  after parsing, by its number of inputs
    ticket.charge(tokens) after tokenising, by its exact token count (image tokens included)

From `enter()` on, a request holds one input until its count is known: requests still being read, parsed or
tokenised count against the limit like those queued for the model. Otherwise every request that found room at
`enter()` would go on to be parsed, and under overload hundreds pile up ahead of the parser, each to be refused
at `admit()` seconds later.

A worker whose event loop runs late is saturated whatever its queue holds: the loop shares one interpreter lock with
the threads that parse, tokenise, decode and batch, and every request it admits then slows every other one, the
refusals and the reading of new connections included. So `enter()` also refuses while the loop runs later than a
bound (`LoopLag`), as long as the worker holds enough to keep the model busy (`busy_floor` tokens); below that it
never refuses for lag, and a worker that does nothing but refuse still admits work. The floor counts tokens, the
work a forward pass does, not inputs: clients holding hundreds of short queries (a closed loop of 512 connections)
are a few passes of work, and refusing them only turns their immediate retries into more work for the loop.

A request larger than the limits alone is admitted when nothing else is in flight, so that every request the API
accepts can run. Released when the request ends, however it ends (answered, failed, timed out, client gone).

Everything here runs on the event loop. (A request that ends before its batch starts is withdrawn from the engine's
queue by serving/runner.py.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from serving.errors import TooManyRequestsError


class Ticket:
    """One request's share of the worker's limits, from `Admission.enter()` until it is released."""

    def __init__(self, admission: Admission):
        self.admission, self.inputs, self.tokens, self.released = admission, 1, 0, False

    def admit(self, inputs: int) -> None:
        """Hold the request's real number of inputs (429 when over, unless it is alone)."""
        a = self.admission
        others = a.inputs - self.inputs
        if others > 0 and others + inputs > a.max_inputs:
            a.on_shed("inputs")
            raise TooManyRequestsError(f"the server is at capacity ({others} of {a.max_inputs} inputs in "
                                       f"flight; this request has {inputs}); retry later",
                                       retry_after_s=a.retry_after_s)
        a.inputs = others + inputs
        self.inputs = inputs
        a.on_change(a.inputs, a.tokens)

    def charge(self, tokens: int) -> None:
        """Add the request's tokens to the worker's total (429 when over, unless it is alone)."""
        a = self.admission
        others = a.tokens - self.tokens
        if others > 0 and others + tokens > a.max_tokens:
            a.on_shed("tokens")
            raise TooManyRequestsError(f"the server is at capacity ({others} of {a.max_tokens} tokens in flight; "
                                       f"this request has {tokens}); retry later", retry_after_s=a.retry_after_s)
        a.tokens = others + tokens
        self.tokens = tokens
        a.on_change(a.inputs, a.tokens)

    def release(self) -> None:
        """Give the request's share back (once; later calls do nothing)."""
        if not self.released:
            self.released = True
            a = self.admission
            a.inputs -= self.inputs
            a.tokens -= self.tokens
            a.requests -= 1
            a.on_change(a.inputs, a.tokens)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LoopLag:
    """How late the running event loop is: a timer due every `interval_s` notes how late it fired.

    `late()` is the larger of the last timer's delay and how overdue the next one is now, so a loop stalled this
    very moment counts as late before its timer gets to run. The timer follows the loop it is asked from (tests run
    one service on several loops in turn).
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = self._delay = 0.0

    def late(self) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._delay = loop, 0.0
            self._schedule()
            return 0.0
        return max(self._delay, time.monotonic() - self._due)

    def _schedule(self) -> None:
        self._due = time.monotonic() + self.interval_s
        loop = self._loop
        loop.call_later(self.interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is self._loop:  # a timer left on a loop no longer asked from stops here
            self._delay = time.monotonic() - self._due
            self._schedule()


class Admission:
    def __init__(self, max_inputs: int, max_tokens: int, *, retry_after_s: int = 1,
                 max_lag_s: float = 0.0, busy_floor: int = 0, lag: LoopLag | None = None,
                 on_shed: Callable[[str], None] = lambda reason: None,
                 on_change: Callable[[int, int], None] = lambda inputs, tokens: None):
        self.max_inputs, self.max_tokens, self.retry_after_s = max_inputs, max_tokens, retry_after_s
        self.max_lag_s, self.busy_floor = max_lag_s, busy_floor  # max_lag_s 0: never refuse for lag
        self.lag = lag or LoopLag()
        self.on_shed, self.on_change = on_shed, on_change  # metrics hooks
        self.inputs = self.tokens = self.requests = 0

    def enter(self) -> Ticket:
        """A ticket holding one input; 429 at once when the worker is full or its loop is late, before the request
        costs anything."""
        if self.inputs >= self.max_inputs or self.tokens >= self.max_tokens:
            self.on_shed("full")
            raise TooManyRequestsError("the server is at capacity; retry later", retry_after_s=self.retry_after_s)
        if self.max_lag_s and self.tokens >= self.busy_floor and self.lag.late() > self.max_lag_s:
            self.on_shed("busy")
            raise TooManyRequestsError("the server is at capacity; retry later", retry_after_s=self.retry_after_s)
        self.inputs += 1  # the gauges show it from admit() on: one update fewer per request
        self.requests += 1
        return Ticket(self)
