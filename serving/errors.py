"""Typed errors, each with its HTTP status and NIM `type`; the one body shape every route answers with.

    {"object": "error", "message": "...", "type": "BadRequestError"}

Messages are for the client: they never carry a stack trace or an internal exception's text.
"""

from __future__ import annotations

from typing import ClassVar


class NimError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "InternalServerError"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return error_body(self.message, self.type)


class BadRequestError(NimError):
    status, type = 400, "BadRequestError"


class AuthenticationError(NimError):
    """A missing or wrong API key; the header tells a client which scheme to use."""

    status, type = 401, "AuthenticationError"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(NimError):
    status, type = 404, "NotFoundError"


class MethodNotAllowedError(NimError):
    status, type = 405, "MethodNotAllowedError"


class PayloadTooLargeError(NimError):
    status, type = 413, "PayloadTooLargeError"


class TooManyRequestsError(NimError):
    """Over the admission limits: shed at once, with Retry-After, before any work is done."""

    status, type = 429, "TooManyRequestsError"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ClientClosedRequest(NimError):
    """The client went away before its answer was ready (nginx's 499): nobody reads it, the access log does."""

    status, type = 499, "ClientClosedRequest"


class InternalServerError(NimError):
    status, type = 500, "InternalServerError"


class ServiceUnavailableError(NimError):
    """Not ready yet, or overloaded: clients should retry, so it always carries Retry-After."""

    status, type = 503, "ServiceUnavailableError"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class GatewayTimeoutError(NimError):
    status, type = 504, "GatewayTimeoutError"


ERRORS_BY_STATUS: dict[int, type[NimError]] = {
    cls.status: cls for cls in (BadRequestError, AuthenticationError, NotFoundError, MethodNotAllowedError,
                                PayloadTooLargeError, TooManyRequestsError, ClientClosedRequest,
                                InternalServerError, ServiceUnavailableError, GatewayTimeoutError)
}


def error_body(message: str, type_: str) -> dict[str, str]:
    return {"object": "error", "message": message, "type": type_}


def error_type(status: int) -> str:
    """The NIM type for any error status (4xx without a class of its own is a BadRequestError)."""
    if status in ERRORS_BY_STATUS:
        return ERRORS_BY_STATUS[status].type
    return "BadRequestError" if status < 500 else "InternalServerError"


def for_status(status: int, message: str) -> NimError:
    """The typed error for a status that came from elsewhere (a batch item, BentoML's batcher)."""
    if status == 503:
        return ServiceUnavailableError(message)
    return ERRORS_BY_STATUS.get(status, BadRequestError if status < 500 else InternalServerError)(message)
