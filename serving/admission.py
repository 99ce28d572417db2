"""Admission control: how much work one worker holds at once, counted in inputs and tokens, not HTTP requests.

A request is admitted in two steps, each refused with 429 and Retry-After in well under a millisecond:

    check_room()          before the body is read: nothing is parsed while the worker is already full
    admit(inputs)         after parsing, by its number of inputs
    ticket.charge(tokens) after tokenising, by its exact token count (image tokens included)

A request larger than the limits alone is admitted when nothing else is in flight, so that every request the API
accepts can run. Released when the request ends, however it ends (answered, failed, timed out, client gone).

Everything here runs on the event loop. (A request that ends before its batch starts is withdrawn from the engine's
queue by serving/runner.py.)
"""

from __future__ import annotations

import itertools
from typing import Callable

from serving.errors import TooManyRequestsError


class Ticket:
    def __init__(self, admission: Admission, id_: int, inputs: int):
        self.admission, self.id, self.inputs, self.tokens = admission, id_, inputs, 0

    def charge(self, tokens: int) -> None:
        """Add the request's tokens to the worker's total (429 when over, unless it is alone)."""
        a = self.admission
        if a.tokens > 0 and a.tokens + tokens > a.max_tokens:
            a.on_shed("tokens")
            raise TooManyRequestsError(f"the server is at capacity ({a.tokens} of {a.max_tokens} tokens in flight; "
                                       f"this request has {tokens}); retry later", retry_after_s=a.retry_after_s)
        a.tokens += tokens
        self.tokens = tokens
        a.on_change(a.inputs, a.tokens)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.admission.release(self)


class Admission:
    def __init__(self, max_inputs: int, max_tokens: int, *, retry_after_s: int = 1,
                 on_shed: Callable[[str], None] = lambda reason: None,
                 on_change: Callable[[int, int], None] = lambda inputs, tokens: None):
        self.max_inputs, self.max_tokens, self.retry_after_s = max_inputs, max_tokens, retry_after_s
        self.on_shed, self.on_change = on_shed, on_change  # metrics hooks
        self.inputs = self.tokens = 0
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count(1)

    def check_room(self) -> None:
        """429 at once when the worker is full, before the request costs anything."""
        if self.inputs >= self.max_inputs or self.tokens >= self.max_tokens:
            self.on_shed("full")
            raise TooManyRequestsError("the server is at capacity; retry later", retry_after_s=self.retry_after_s)

    def admit(self, inputs: int) -> Ticket:
        if self.inputs > 0 and self.inputs + inputs > self.max_inputs:
            self.on_shed("inputs")
            raise TooManyRequestsError(f"the server is at capacity ({self.inputs} of {self.max_inputs} inputs in "
                                       f"flight; this request has {inputs}); retry later",
                                       retry_after_s=self.retry_after_s)
        ticket = Ticket(self, next(self._ids), inputs)
        self.inputs += inputs
        self._tickets[ticket.id] = ticket
        self.on_change(self.inputs, self.tokens)
        return ticket

    def release(self, ticket: Ticket) -> None:
        if self._tickets.pop(ticket.id, None) is not None:
            self.inputs -= ticket.inputs
            self.tokens -= ticket.tokens
            self.on_change(self.inputs, self.tokens)

    @property
    def requests(self) -> int:
        return len(self._tickets)
