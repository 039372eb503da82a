"""Server: assembles the service (HTTP app, gRPC server, engine) and owns its lifecycle.

One process, one asyncio loop: uvicorn serves the Starlette app (OIP REST, OpenAI, TEI,
``/metrics``) and ``grpc.aio`` the OIP gRPC service; the PackRunner keeps its own engine thread.

Lifecycle (``async with Server(settings) as server``, or :meth:`Server.serve_until_signal`):

1. the listeners open first, so health checks answer (not ready) while the model warms up;
2. the engine starts and runs one full batch; then ready;
3. on SIGTERM / SIGINT (or :meth:`stop`): not ready, new requests get 503 while the listeners
   stay open, admitted requests drain for up to ``graceful_shutdown_timeout``; then both
   listeners close and the runner stops. uvicorn's own signal handling (which re-raises the
   signal after shutdown, so the process would not exit 0) is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import TracebackType
from typing import Self

import grpc.aio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from packrunner.serve.engine import Engine
from packrunner.serve.grpc_service import add_inference_service, server_options
from packrunner.serve.metrics import CONTENT_TYPE, ServeMetrics
from packrunner.serve.model import ServedModel, load_model
from packrunner.serve.openai_routes import openai_routes
from packrunner.serve.service import Service
from packrunner.serve.settings import ServeSettings
from packrunner.serve.tei_routes import tei_routes
from packrunner.serve.v2_routes import v2_routes

__all__ = ["Server", "build_app"]

logger = logging.getLogger("packrunner.serve")


def build_app(service: Service) -> Starlette:
    """The Starlette application with every HTTP route."""

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        *v2_routes(service),
        *openai_routes(service),
        *tei_routes(service),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the Server owns shutdown (and the exit status)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


class Server:
    """One ``packrunner serve`` instance.

    Args:
        settings: The configuration.
        model: The model to serve (default: loaded from ``settings``).
    """

    def __init__(self, settings: ServeSettings, model: ServedModel | None = None) -> None:
        self.settings = settings
        self.model = model if model is not None else load_model(settings)
        self.metrics = ServeMetrics(self.model.name, self.model.config.max_valid_num)
        self.engine = Engine(
            self.model, self.metrics, max_concurrent_requests=settings.max_concurrent_requests
        )
        self.service = Service(settings, self.model, self.engine, self.metrics)
        self.app = build_app(self.service)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._socket: socket.socket | None = None
        self._http: _Uvicorn | None = None
        self._http_loop: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._stopped = False

    async def start(self) -> None:
        """Open both listeners, then warm the engine up (ready when this returns)."""
        settings = self.settings
        self._stopping = asyncio.Event()
        if settings.grpc_port is not None:
            self._grpc = grpc.aio.server(options=server_options(settings))
            add_inference_service(self._grpc, self.service)
            self.grpc_port = self._grpc.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
            await self._grpc.start()
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((settings.host, settings.http_port))
        self.http_port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(settings.graceful_shutdown_timeout)),
        )
        config.load()
        self._http = _Uvicorn(config)
        self._http.lifespan = config.lifespan_class(config)
        await self._http.startup(sockets=[self._socket])
        self._http_loop = asyncio.create_task(self._http.main_loop())
        await self.engine.start()
        logger.info(
            "serving %s: HTTP %s:%s, gRPC %s", self.model.name, settings.host, self.http_port,
            f"{settings.host}:{self.grpc_port}" if self.grpc_port is not None else "off",
        )  # fmt: skip

    def request_stop(self) -> None:
        """Begin a graceful stop: not ready and no new requests from now on (call on the loop)."""
        self.engine.begin_drain()
        if self._stopping is not None:
            self._stopping.set()

    async def serve_until_stopped(self) -> None:
        """Serve until :meth:`request_stop`, then stop gracefully."""
        assert self._stopping is not None, "start() first"
        await self._stopping.wait()
        await self.stop()

    async def serve_until_signal(self) -> None:
        """Serve until SIGTERM / SIGINT (or :meth:`request_stop`), then stop gracefully."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.serve_until_stopped()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def stop(self) -> None:
        """Drain admitted requests (503 to new ones, listeners open), then close everything."""
        if self._stopped:
            return
        self._stopped = True
        timeout = self.settings.graceful_shutdown_timeout
        drained = await self.engine.drain(timeout)
        if not drained:
            logger.warning("graceful shutdown: requests still running after %s s", timeout)
        if self._grpc is not None:
            await self._grpc.stop(grace=0 if drained else None)
        if self._http is not None and self._http_loop is not None:
            self._http.should_exit = True
            await self._http_loop
            await self._http.shutdown(sockets=[self._socket] if self._socket else None)
        if self._socket is not None:
            self._socket.close()
        await self.engine.close()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
