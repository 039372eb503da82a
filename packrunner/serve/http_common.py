"""What every HTTP route shares: auth, body limit, admission, disconnects, errors, metrics.

:func:`endpoint` turns a protocol handler ``(Call) -> Response`` into a Starlette endpoint:

1. ``--api-key`` check on protected routes (401);
2. the body is read raw (whatever the Content-Type) up to ``--payload-limit`` (413);
3. inference routes take an admission slot (429 when full, 503 when not ready) and race the
   handler against the client disconnecting: a client that goes away cancels the handler, whose
   awaited results are cancelled, which withdraws its samples if not yet packed;
4. a :class:`ServeError` becomes the protocol's error body and status (with ``Retry-After``);
5. one metrics record (and access-log line) per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from packrunner.serve.errors import ErrorKind, Protocol, ServeError
from packrunner.serve.service import Service

__all__ = ["Call", "Handler", "endpoint", "error_response", "json_body"]

logger = logging.getLogger("packrunner.serve")

#: Status recorded for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = "499"


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request as a handler sees it."""

    request: Request
    body: bytes
    service: Service


Handler = Callable[[Call], Awaitable[Response]]


def error_response(protocol: Protocol, error: ServeError) -> Response:
    """The protocol's error body: v2 ``{"error"}``, TEI ``{"error", "error_type"}``, OpenAI's
    nested ``{"error": {...}}``; ``Retry-After`` when the error has one."""
    kind = error.kind
    content: dict[str, Any]
    if protocol is Protocol.OPENAI:
        content = {
            "error": {
                "message": error.message,
                "type": kind.value.openai_type,
                "param": None,
                "code": kind.name.lower(),
            }
        }
    elif protocol is Protocol.TEI:
        content = {"error": error.message, "error_type": kind.value.tei_type}
    else:
        content = {"error": error.message}
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(content, status_code=kind.http_status(protocol), headers=headers)


def json_body(call: Call) -> Any:
    """The body parsed as JSON (VALIDATION error if it is not)."""
    try:
        return json.loads(call.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(ErrorKind.VALIDATION, f"malformed JSON body: {exc}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"request body of {declared} bytes exceeds payload_limit={limit}",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(
                ErrorKind.PAYLOAD_TOO_LARGE, f"request body exceeds payload_limit={limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response | None:
    """``work``'s response, or None (after cancelling it) if the client disconnected first.

    ``work`` runs in the calling task; one watcher task waits for the disconnect and cancels
    the caller. (A task for ``work`` too and an ``asyncio.wait`` over both cost the event loop,
    which is the server's bottleneck, about 5% of its time per request.)
    """
    current = asyncio.current_task()
    assert current is not None
    gone = finished = False

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        # A callback scheduled just before ``work`` finished must not cancel what follows.
        if watcher.cancelled() or finished:
            return
        watcher.exception()  # retrieved: a failing receive() counts as a disconnect too
        gone = True
        current.cancel()

    watcher = asyncio.ensure_future(_disconnected(request.receive))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        # Only our own cancellation means "the client left"; any other is re-raised.
        if gone and current.uncancel() == 0:
            return None
        raise
    finally:
        finished = True
        watcher.cancel()


def endpoint(
    service: Service,
    route: str,
    protocol: Protocol,
    handler: Handler,
    *,
    inference: bool = False,
    protected: bool = True,
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint running ``handler`` with the shared behaviour (module docstring)."""

    async def serve(request: Request) -> Response:
        started = time.monotonic()
        failure: ServeError | None = None
        response: Response | None
        try:
            if protected and not service.authorized(request.headers.get("authorization")):
                raise ServeError(ErrorKind.UNAUTHENTICATED, "missing or invalid API key")
            body = b""
            if request.method == "POST":
                body = await _read_body(request, service.settings.payload_limit)
            call = Call(request, body, service)
            if inference:
                with service.engine.admit():
                    response = await _unless_disconnected(request, handler(call))
            else:
                response = await handler(call)
        except ServeError as error:
            failure = error
            response = error_response(protocol, error)
        except ClientDisconnect:
            response = None
        except Exception as exc:  # a bug: still answer in the protocol's error shape
            logger.exception("unhandled error on %s", request.url.path)
            failure = ServeError(ErrorKind.BACKEND, f"internal error: {exc!r}")
            response = error_response(protocol, failure)
        status = CLIENT_CLOSED if response is None else str(response.status_code)
        service.record(
            route,
            protocol,
            status,
            started,
            failure,
            method=request.method,
            path=request.url.path,
            client=request.client.host if request.client else None,
        )
        return response if response is not None else Response(status_code=499)

    return serve
