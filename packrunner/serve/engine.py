"""The engine adapter: the only module of the service that talks to the PackRunner.

It owns admission (``--max-concurrent-requests``: over it, 429 at once), readiness (the runner's
warm-up ran one full batch, the runner is healthy, and the service is not draining), deadlines
(passed to the runner per sample, which withdraws samples not yet packed and discards results
packed too late) and the drain on shutdown. Several sequences of one request are submitted as
separate samples and gathered; the first failure cancels the rest.

:class:`BaseEngine` is what the routes use (admission, readiness, drain, ``run``); :class:`Engine`
runs on a local PackRunner, ``packrunner.integrations.ray.HandleEngine`` on Ray Serve replicas.
The runner's device is wrapped in :class:`InstrumentedDevice` to observe each batch (device time,
samples, token fill) for the metrics without touching the runner.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from packrunner.devices.base import Device, OutputSpec, TensorSpec
from packrunner.errors import PackRunnerError, RequestTimeoutError
from packrunner.runner import PackRunner, Result
from packrunner.serve.errors import ErrorKind, ServeError, from_engine_error
from packrunner.serve.metrics import ServeMetrics
from packrunner.serve.model import ServedModel

__all__ = [
    "BaseEngine",
    "BatchMetrics",
    "BatchObserver",
    "Engine",
    "EngineState",
    "InstrumentedDevice",
]


class EngineState(enum.Enum):
    """Lifecycle of the engine as health checks see it."""

    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class BatchObserver(Protocol):
    """Something that records one value (a Prometheus or a Ray histogram)."""

    def observe(self, value: float, /) -> Any: ...


class BatchMetrics(Protocol):
    """Where :class:`InstrumentedDevice` records each batch."""

    @property
    def device_duration(self) -> BatchObserver: ...

    @property
    def batch_samples(self) -> BatchObserver: ...

    @property
    def batch_token_fill(self) -> BatchObserver: ...


class InstrumentedDevice(Device):
    """Delegates to a device and records each batch in the metrics (on the worker thread)."""

    def __init__(self, device: Device, metrics: BatchMetrics, mask_input: str) -> None:
        self._device = device
        self._metrics = metrics
        self._mask_input = mask_input
        #: (start, end) monotonic times of the last finished batch.
        self.last_batch = (0.0, 0.0)

    @property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        return self._device.input_specs

    @property
    def output_specs(self) -> Mapping[str, OutputSpec]:
        return self._device.output_specs

    @property
    def input_value_limits(self) -> Mapping[str, int]:
        return self._device.input_value_limits

    def open(self) -> None:
        self._device.open()

    def close(self) -> None:
        self._device.close()

    def run(
        self, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        start = time.monotonic()
        outputs = self._device.run(feeds)
        end = time.monotonic()
        self.last_batch = (start, end)
        self._metrics.device_duration.observe(end - start)
        mask = feeds.get(self._mask_input)
        if mask is not None:
            # Segment ids run 1..k in each row (0/1 for a padded mask): a row's maximum is the
            # number of sequences in it.
            self._metrics.batch_samples.observe(int(mask.max(axis=1).sum()))
            self._metrics.batch_token_fill.observe(np.count_nonzero(mask) / mask.size)
        return outputs


class BaseEngine(abc.ABC):
    """What the front ends need from an engine: admission, readiness, running, drain, close.

    Admission and drain are shared here; subclasses say how sequences run (:class:`Engine`: a
    local PackRunner; ``packrunner.integrations.ray``: runner replicas behind Ray Serve
    deployment handles) and whether that backend is healthy.

    Args:
        metrics: Where rejections (and, by subclasses, runs) are recorded.
        max_concurrent_requests: Requests admitted at once.
    """

    def __init__(self, metrics: ServeMetrics, *, max_concurrent_requests: int) -> None:
        self._metrics = metrics
        self._max_concurrent = max_concurrent_requests
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.state = EngineState.STARTING
        metrics.watch_in_flight(lambda: self._in_flight)

    @property
    def accepting(self) -> bool:
        """Whether inference requests are admitted (warmed up and not draining)."""
        return self.state is EngineState.READY

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether the backend can serve (e.g. the runner is warmed up and not degraded)."""

    @property
    def ready(self) -> bool:
        """Readiness: admitting requests and the backend healthy.

        A degraded runner (its last batch failed or timed out) still admits requests, since
        only a successful batch restores it; readiness tells load balancers to look elsewhere.
        """
        return self.accepting and self.healthy

    async def start(self) -> None:
        """Bring the backend up (:meth:`_start`), then report ready."""
        self._idle = asyncio.Event()
        self._idle.set()
        await self._start()
        self.state = EngineState.READY

    @abc.abstractmethod
    async def _start(self) -> None:
        """Start the backend and warm it up."""

    @abc.abstractmethod
    async def run(
        self, samples: Sequence[Mapping[str, Any]], deadline: float | None
    ) -> list[Result]:
        """Run one request's sequences; ``deadline`` is absolute on the loop's clock.

        Raises:
            ServeError: VALIDATION (a bad sequence), OVERLOADED (queue full), DEADLINE,
                BACKEND (the device failed), UNAVAILABLE (closing).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the backend (sequences still queued fail with UNAVAILABLE)."""

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of ``max_concurrent_requests`` slots for a request.

        Raises:
            ServeError: UNAVAILABLE while not ready (warming, draining), OVERLOADED when full.
        """
        if not self.accepting:
            self._metrics.rejected.labels("unavailable").inc()
            raise ServeError(
                ErrorKind.UNAVAILABLE, f"server is {self.state.value}", retry_after_s=1
            )
        if self._in_flight >= self._max_concurrent:
            self._metrics.rejected.labels("overloaded").inc()
            raise ServeError(
                ErrorKind.OVERLOADED,
                f"model is overloaded: {self._in_flight} requests in flight "
                f"(max_concurrent_requests={self._max_concurrent})",
                retry_after_s=1,
            )
        assert self._idle is not None
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def begin_drain(self) -> None:
        """Stop admitting (new requests get UNAVAILABLE) and report not ready."""
        if self.state is not EngineState.STOPPED:
            self.state = EngineState.DRAINING

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting; wait up to ``grace_s`` for admitted requests. True if all ended."""
        self.begin_drain()
        if self._idle is None:
            return True
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class Engine(BaseEngine):
    """Runs requests' sequences on a local PackRunner with admission, deadlines and readiness.

    Args:
        model: The served model (its device and runner config).
        metrics: Where batches, queue time and rejections are recorded.
        max_concurrent_requests: Requests admitted at once.
    """

    def __init__(
        self, model: ServedModel, metrics: ServeMetrics, *, max_concurrent_requests: int
    ) -> None:
        super().__init__(metrics, max_concurrent_requests=max_concurrent_requests)
        self._device = InstrumentedDevice(model.device, metrics, model.config.mask_input_name)
        self._runner = PackRunner(self._device, model.config)
        metrics.watch_runner(self._runner)

    @property
    def runner(self) -> PackRunner:
        """The runner (for statistics)."""
        return self._runner

    @property
    def healthy(self) -> bool:
        """The runner is warmed up and not degraded."""
        return self._runner.health().ready

    async def _start(self) -> None:
        """Start the runner and run one full batch (the runner's warm-up)."""
        await asyncio.to_thread(self._runner.start)
        self.state = EngineState.WARMING
        await self._runner.warmup_async()

    async def run(
        self, samples: Sequence[Mapping[str, Any]], deadline: float | None
    ) -> list[Result]:
        """Run one request's sequences; ``deadline`` is absolute on the loop's clock.

        Raises:
            ServeError: VALIDATION (a bad sequence), OVERLOADED (queue full), DEADLINE,
                BACKEND (the device failed), UNAVAILABLE (closing).
        """
        submitted = time.monotonic()
        loop = asyncio.get_running_loop()
        # The runner owns deadlines (one timer per request on its engine loop): a sample whose
        # deadline passes before packing is withdrawn, after packing its result is discarded,
        # and either way the future fails with RequestTimeoutError.
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        futures: list[asyncio.Future[Result]] = []
        try:
            try:
                for sample in samples:
                    # One at a time (not extend): the futures of samples already queued must
                    # be known if a later submit fails, to withdraw them.
                    futures.append(self._runner.execute_async(sample, timeout=timeout))  # noqa: PERF401
                # One sequence (the usual request) needs no gather future and its callbacks.
                results = (
                    [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
                )
            except PackRunnerError as exc:
                if isinstance(exc, RequestTimeoutError):
                    self._metrics.timed_out.inc()
                raise from_engine_error(exc) from exc
        finally:
            # On any failure or cancellation (client gone): withdraw what is unpacked.
            for future in futures:
                future.cancel()
        batch_start, _ = self._device.last_batch
        self._metrics.queue_duration.observe(max(0.0, batch_start - submitted))
        return results

    async def close(self) -> None:
        """Stop the runner (samples still queued fail with UNAVAILABLE)."""
        self.state = EngineState.STOPPED
        await self._runner.aclose(drain=False)
