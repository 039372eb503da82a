"""Service errors: one kind per failure, mapped once to each protocol's status and body.

Every failure a handler can produce becomes a :class:`ServeError` of some :class:`ErrorKind`
(engine errors are translated by :func:`from_engine_error`); the protocol front ends only look up
how their protocol spells that kind. The table below is the documented error contract.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc

from packrunner.errors import (
    DeviceError,
    InvalidSampleError,
    OverloadedError,
    PackRunnerError,
    RequestTimeoutError,
    RunnerClosedError,
    RunnerNotStartedError,
)

__all__ = ["ErrorKind", "Protocol", "ServeError", "from_engine_error", "invalid"]


class Protocol(enum.Enum):
    """The front end a request came in through."""

    V2 = "v2"
    GRPC = "grpc"
    OPENAI = "openai"
    TEI = "tei"


@dataclass(frozen=True, slots=True)
class _Spelling:
    v2: int
    openai: int
    tei: int
    grpc: grpc.StatusCode
    tei_type: str
    openai_type: str
    reason: str  # the failure-reason label of the metrics


class ErrorKind(enum.Enum):
    """A failure, and how each protocol reports it (HTTP status / gRPC code / body type)."""

    EMPTY = _Spelling(
        400, 400, 400, grpc.StatusCode.INVALID_ARGUMENT, "empty", "invalid_request_error",
        "validation",
    )  # fmt: skip
    VALIDATION = _Spelling(
        400, 400, 422, grpc.StatusCode.INVALID_ARGUMENT, "validation", "invalid_request_error",
        "validation",
    )  # fmt: skip
    TOO_MANY_SEQUENCES = _Spelling(
        413, 400, 422, grpc.StatusCode.INVALID_ARGUMENT, "validation", "invalid_request_error",
        "batch_size",
    )  # fmt: skip
    PAYLOAD_TOO_LARGE = _Spelling(
        413, 413, 413, grpc.StatusCode.RESOURCE_EXHAUSTED, "payload", "invalid_request_error",
        "payload",
    )  # fmt: skip
    NOT_FOUND = _Spelling(
        404, 404, 404, grpc.StatusCode.NOT_FOUND, "not_found", "invalid_request_error",
        "not_found",
    )  # fmt: skip
    UNAUTHENTICATED = _Spelling(
        401, 401, 401, grpc.StatusCode.UNAUTHENTICATED, "unauthorized", "authentication_error",
        "unauthenticated",
    )  # fmt: skip
    OVERLOADED = _Spelling(
        429, 429, 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", "rate_limit_error",
        "overloaded",
    )  # fmt: skip
    UNAVAILABLE = _Spelling(
        503, 503, 503, grpc.StatusCode.UNAVAILABLE, "unhealthy", "server_error", "unavailable",
    )  # fmt: skip
    DEADLINE = _Spelling(
        504, 504, 504, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout", "timeout", "timeout",
    )  # fmt: skip
    BACKEND = _Spelling(
        500, 500, 424, grpc.StatusCode.INTERNAL, "backend", "server_error", "backend",
    )  # fmt: skip

    def http_status(self, protocol: Protocol) -> int:
        """The HTTP status of this kind on ``protocol``'s routes."""
        spelling = self.value
        if protocol is Protocol.OPENAI:
            return spelling.openai
        if protocol is Protocol.TEI:
            return spelling.tei
        return spelling.v2

    @property
    def grpc_code(self) -> grpc.StatusCode:
        """The gRPC status code of this kind."""
        return self.value.grpc

    @property
    def reason(self) -> str:
        """The ``reason`` label of ``packrunner_server_failures_total``."""
        return self.value.reason


class ServeError(PackRunnerError):
    """A request failed; ``kind`` decides the status each protocol answers with.

    Attributes:
        kind: What went wrong.
        message: Said to the client.
        retry_after_s: For OVERLOADED / UNAVAILABLE: the ``Retry-After`` to advertise.
    """

    def __init__(self, kind: ErrorKind, message: str, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its keyword argument, so it crosses process boundaries intact (a Ray
        # Serve runner replica raises it to the ingress that called it).
        return (_rebuild_serve_error, (self.kind, self.message, self.retry_after_s))


def _rebuild_serve_error(kind: ErrorKind, message: str, retry_after_s: int | None) -> ServeError:
    return ServeError(kind, message, retry_after_s=retry_after_s)


def invalid(message: str) -> ServeError:
    """A VALIDATION error: the request is malformed or asks for something impossible."""
    return ServeError(ErrorKind.VALIDATION, message)


def from_engine_error(error: PackRunnerError) -> ServeError:
    """The service error for an engine exception raised by submit or by a result future."""
    if isinstance(error, ServeError):
        return error
    if isinstance(error, InvalidSampleError):
        return ServeError(ErrorKind.VALIDATION, str(error))
    if isinstance(error, OverloadedError):
        return ServeError(ErrorKind.OVERLOADED, f"overloaded: {error}", retry_after_s=1)
    if isinstance(error, RequestTimeoutError):
        return ServeError(ErrorKind.DEADLINE, str(error))
    if isinstance(error, RunnerClosedError | RunnerNotStartedError):
        return ServeError(ErrorKind.UNAVAILABLE, f"not serving: {error}", retry_after_s=1)
    if isinstance(error, DeviceError):
        return ServeError(ErrorKind.BACKEND, str(error))
    return ServeError(ErrorKind.BACKEND, f"internal error: {error}")
