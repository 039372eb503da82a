"""Serve test support: a real server on loopback, in a thread with its own event loop.

The sync clients under test (tritonclient, openai, httpx) block the test's thread, so the server
runs on a private loop in a background thread; ports are picked by the OS (port 0).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from types import TracebackType
from typing import Any

from packrunner import Device, RunnerConfig
from packrunner.serve import ServedModel, Server, ServeSettings
from packrunner.serve.tokenizer import TextEncoder

#: A small packed batch keeps the ORT model quick on a shared 2-core machine.
TEST_SETTINGS = ServeSettings(
    http_port=0,
    grpc_port=0,
    batch_size=4,
    seq_len=64,
    max_valid_num=8,
    # Long enough that the sequences of one request share a batch even if the submitting
    # thread stalls on a loaded machine, as they do in the in-process reference runs: both
    # then see identical feeds, so outputs are bit-identical.
    batch_timeout_us=50_000,
    threads=1,
    max_client_batch_size=4,
    graceful_shutdown_timeout=10.0,
)


class ServerThread:
    """Runs a :class:`Server` on its own loop in a thread; a context manager."""

    def __init__(self, settings: ServeSettings, model: ServedModel | None = None) -> None:
        self.settings = settings
        self._model = model
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._thread = threading.Thread(target=self._main, name="serve-test-loop", daemon=True)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.server = Server(self.settings, self._model)
            async with self.server:
                self._started.set()
                await self.server.serve_until_stopped()
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    @property
    def http(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    @property
    def grpc(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    def call(self, function: Any) -> Any:
        """Run ``function()`` on the server's loop and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def launch(self) -> None:
        """Start the server's thread without waiting for it to be ready."""
        self._thread.start()

    def wait_ready(self) -> None:
        """Wait until the server started (listeners open, warm-up done)."""
        assert self._started.wait(120), "server did not start"
        if self._error is not None:
            raise self._error

    def request_stop(self) -> None:
        """Begin the graceful stop on the server's loop; returns once it is draining."""
        assert self.server is not None
        self.call(self.server.request_stop)

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "server did not stop"
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ServerThread:
        self.launch()
        self.wait_ready()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self.server is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_stop)
        self.join()


def settings(**changes: Any) -> ServeSettings:
    """The test settings with some fields changed."""
    return replace(TEST_SETTINGS, **changes)


def served(
    device: Device,
    name: str,
    *,
    encoder: TextEncoder | None = None,
    labels: tuple[str, ...] = (),
    **config: Any,
) -> ServedModel:
    """A model served from a test device; ``config`` overrides one sample per batch at once."""
    shape = device.input_specs["input_ids"].shape
    runner = {"batch_size": shape[0], "seq_len": shape[1], "max_valid_num": 1, "timeout_us": 0}
    return ServedModel(
        name=name,
        source="test",
        device=device,
        config=RunnerConfig(**{**runner, **config}),
        encoder=encoder,
        outputs=dict(device.output_specs),
        labels=labels,
    )
