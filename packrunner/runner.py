"""PackRunner: the engine and its thin blocking / asyncio entry points.

Ownership model (the invariant the rest of the code relies on):

* **Caller threads** (any number, any event loop) only validate their sample (into the runner's
  own copy) and append it to the pending queue under ``_lock``. ``execute``, ``execute_async``
  and ``submit`` share this one submit path.
* **The engine thread** runs the runner's own private event loop (uvloop when installed). The
  batching coroutine is the only code that plans, packs and unpacks batches, expires deadlines
  and resolves futures; it sleeps on an event until an arrival, a deadline or a finished batch
  needs it. Device watchdogs are timers on the same loop (see :mod:`packrunner._workers`).
* **One worker thread per device** owns that device: it alone calls ``open``/``run``/``close``.

Every accepted request is *settled* exactly once, under ``_lock``: completed, failed, withdrawn
(cancelled or past its deadline before packing) or discarded (past its deadline after packing).
Only the code that settles a request resolves its future.

Why a private loop rather than the caller's: the batcher's deadlines stay precise whatever the
caller's loop is doing (a caller that blocks its own loop cannot stall everybody's batches), the
runner serves many caller loops and plain threads at once, and sync and async callers exercise
exactly the same machinery. The cost is one thread hop per result, paid once per batch per
caller loop (results for one loop are delivered in a single ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import heapq
import itertools
import logging
import math
import numbers
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from packrunner._codec import BatchFeeder, PreparedSample
from packrunner._workers import Batch, WorkerPool
from packrunner.config import RunnerConfig
from packrunner.cost import CostModel
from packrunner.devices.base import BatchShape, Device
from packrunner.errors import (
    ConfigError,
    DeviceError,
    DeviceTimeoutError,
    OverloadedError,
    PackRunnerError,
    RequestTimeoutError,
    RunnerClosedError,
    RunnerNotStartedError,
    short_repr,
)
from packrunner.health import Health, HealthState
from packrunner.packing import PackPlan, plan_batch
from packrunner.shaping import plan_shaped
from packrunner.stats import RunnerStats

__all__ = ["CALIBRATION_RUNS", "LATENCY_BUCKETS_S", "PackRunner", "Result"]

#: Batches of each calibration shape :meth:`PackRunner.warmup` times (their median counts).
CALIBRATION_RUNS = 3

#: Upper bounds (seconds, inclusive) of the request-latency histogram in :class:`RunnerStats`.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_LATENCY_BOUNDS = np.array(LATENCY_BUCKETS_S)

logger = logging.getLogger("packrunner")

#: One sample's outputs: output name -> array whose first dim is the sample's length.
Result = dict[str, npt.NDArray[Any]]
Sample = Mapping[str, Any]
#: What a request ends with: its result, or the exception its future is failed with.
_Outcome = Result | BaseException

_AnyFuture = concurrent.futures.Future[Result] | asyncio.Future[Result]


class _State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Wait(enum.Enum):
    """What the batcher is asleep for; lets submitters wake it only when it matters."""

    BUSY = 0  # awake, or a wake-up is already scheduled
    ARRIVAL = 1  # queue empty: the first arrival wakes it
    FILL = 2  # waiting for the deadline: wake if arrivals might complete a batch
    DEVICE = 3  # every in-flight slot taken: arrivals cannot change anything


@dataclass(slots=True, eq=False)
class _Request:
    id: int
    sample: PreparedSample
    arrival: float
    future: _AnyFuture
    loop: asyncio.AbstractEventLoop | None  # the caller's loop for async requests
    timeout: float | None = None
    settled: bool = False  # guarded by _lock: its outcome is decided (see the module doc)


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    rejected_invalid: int = 0
    rejected_overloaded: int = 0
    withdrawn: int = 0
    discarded: int = 0
    completed: int = 0
    failed: int = 0
    nonfinite: int = 0
    batches: int = 0
    batches_full: int = 0
    batches_timeout: int = 0
    batches_failed: int = 0
    device_timeouts: int = 0
    devices_replaced: int = 0
    samples: int = 0
    tokens: int = 0
    token_slots: int = 0  # rows * width of every batch
    device_busy_s: float = 0.0
    latency_sum_s: float = 0.0
    queue_wait_sum_s: float = 0.0
    latency_counts: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(len(LATENCY_BUCKETS_S) + 1, dtype=np.int64)
    )


class PackRunner:
    """Packs single variable-length samples into fixed-shape batches and runs them on devices.

    Args:
        device: One :class:`~packrunner.Device`, or several identical ones (one worker thread
            each; batches go to whichever is free).
        config: Batching configuration; default :class:`~packrunner.RunnerConfig()`.
        use_uvloop: Run the engine loop on uvloop when it is installed.

    Example:
        >>> from packrunner import PackRunner, RunnerConfig, SimulatedDevice
        >>> with PackRunner(SimulatedDevice(batch_latency_us=0), RunnerConfig()) as runner:
        ...     out = runner.execute({"input_ids": [101, 2023, 102]})
        >>> out["start_logits"].shape
        (3,)
    """

    def __init__(
        self,
        device: Device | Sequence[Device],
        config: RunnerConfig | None = None,
        *,
        use_uvloop: bool = True,
    ) -> None:
        self._config = config if config is not None else RunnerConfig()
        self._devices: tuple[Device, ...] = (
            (device,) if isinstance(device, Device) else tuple(device)
        )
        if not self._devices or not all(isinstance(d, Device) for d in self._devices):
            raise ConfigError(
                f"device must be a Device or a non-empty sequence of them, got {device!r}"
            )
        self._feeder = BatchFeeder(self._devices, self._config)
        shapes = self._feeder.shapes
        # Devices with several shapes get shape-aware plans, compared in estimated time: the
        # prior until warmup() times the device's shapes.
        self._shaped = not shapes.is_single
        self._cost = CostModel.prior(shapes)
        self._timings: dict[BatchShape, list[float]] | None = None  # while calibrating
        # Engine-thread seconds spent planning, building feeds and cutting results (shaped
        # runners): per batch, part of a batch's cost, so the planner does not split work into
        # many small batches whose host work the device time alone would not show.
        self._host_busy_s = 0.0
        # Cheap necessary condition for a full batch at some shape (see _may_be_full_locked).
        if shapes.is_dynamic:
            self._full_rows = shapes.rows_for(shapes.max_width)
            self._full_tokens = min(
                shapes.rows_for(w) * w for w in (shapes.width_multiple, shapes.max_width)
            )
        else:
            self._full_rows = min(rows for rows, _ in shapes.compiled)
            self._full_tokens = min(rows * width for rows, width in shapes.compiled)
        self._max_inflight = self._config.max_inflight_batches or len(self._devices) + 1
        self._window = max(self._config.lookahead, self._config.max_valid_num + 1)
        self._use_uvloop = use_uvloop

        self._lock = threading.Lock()
        # Serialises start() and close() against each other (they block on threads, so they
        # cannot hold _lock, which submitters take).
        self._lifecycle = threading.Lock()
        self._state = _State.CREATED
        self._pending: OrderedDict[int, _Request] = OrderedDict()
        self._pending_tokens = 0
        # Deadlines of accepted requests, earliest first; settled ones are skipped when popped.
        self._deadlines: list[tuple[float, int, _Request]] = []
        self._inflight = 0
        self._wait = _Wait.BUSY
        self._wake_at = -math.inf  # when the sleeping batcher wakes anyway (-inf: it is awake)
        self._ids = itertools.count()
        self._counters = _Counters()
        self._warmed_up = False
        self._degraded: str | None = None  # why the last batch failed, until one succeeds

        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._engine_thread: threading.Thread | None = None
        self._pool = WorkerPool(self._lock, self._config.device_timeout_s)

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def config(self) -> RunnerConfig:
        """The configuration."""
        return self._config

    def start(self) -> Self:
        """Start the engine thread and one worker thread per device; open the devices.

        Returns:
            The runner itself.

        Raises:
            DeviceError: A device failed to open; nothing is left running.
            RunnerClosedError: The runner was already closed.
        """
        with self._lifecycle:
            return self._start()

    def _start(self) -> Self:
        with self._lock:
            if self._state is _State.RUNNING:
                return self
            if self._state is not _State.CREATED:
                raise RunnerClosedError("a closed PackRunner cannot be restarted; create a new one")
        failure = self._pool.open(self._devices)
        if failure is not None:
            self._pool.stop()
            with self._lock:
                self._state = _State.CLOSED
            raise DeviceError(f"device failed to open: {failure!r}") from failure

        loop_ready = threading.Event()
        self._engine_thread = threading.Thread(
            target=self._engine_main, args=(loop_ready,), name="packrunner-engine", daemon=True
        )
        with self._lock:
            self._state = _State.RUNNING
        self._engine_thread.start()
        loop_ready.wait()
        return self

    def close(self, *, drain: bool = True) -> None:
        """Stop accepting samples and shut down; no future is left pending.

        Returns once every accepted request is resolved and the engine and device threads are
        joined. A device stuck in ``run`` is waited for at most ``device_timeout_s`` (its batch
        then fails with :class:`~packrunner.DeviceTimeoutError` and its thread is abandoned);
        with ``device_timeout_s=None`` a hung device blocks ``close`` for ever.

        Args:
            drain: True runs every accepted sample (batches are dispatched at once, without
                waiting for timeouts) and delivers its result. False fails samples still
                waiting to be packed with :class:`~packrunner.RunnerClosedError`; batches
                already on a device finish and deliver normally.
        """
        if threading.current_thread() is self._engine_thread:
            # From a submit() callback: begin the shutdown; the engine finishes it itself.
            self._begin_close(drain)
            return
        with self._lifecycle:
            self._begin_close(drain)
            if self._engine_thread is not None:
                self._engine_thread.join()

    def _begin_close(self, drain: bool) -> None:
        with self._lock:
            state = self._state
            if state is _State.CREATED:
                self._state = _State.CLOSED
                return
            abandoned: list[_Request] = []
            if state is _State.RUNNING:
                self._state = _State.CLOSING
                if not drain:
                    abandoned = self._take_pending_locked()
                    self._counters.failed += len(abandoned)
        if abandoned:
            message = "the runner was closed before this sample was packed"
            _deliver([(r, RunnerClosedError(message)) for r in abandoned])
        if state is _State.RUNNING:
            self._wake_threadsafe()

    async def aclose(self, *, drain: bool = True) -> None:
        """Async form of :meth:`close` (runs the blocking shutdown in a thread)."""
        await asyncio.to_thread(self.close, drain=drain)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -------------------------------------------------------------------------------- health

    def health(self) -> Health:
        """Liveness, readiness and the reason, for a service's health endpoints.

        Ready means running, warmed up (:meth:`warmup`) and not degraded; see
        :mod:`packrunner.health`.
        """
        with self._lock:
            state, degraded, warmed = self._state, self._degraded, self._warmed_up
            lost = self._pool.lost
        if state is _State.CREATED:
            return Health(HealthState.STARTING, True, False, "not started")
        if state is _State.CLOSING:
            return Health(HealthState.CLOSING, True, False, "closing")
        if state is _State.CLOSED:
            return Health(HealthState.CLOSED, False, False, "closed")
        if lost is not None:
            return Health(HealthState.DEGRADED, False, False, lost)
        if degraded is not None:
            return Health(HealthState.DEGRADED, True, False, degraded)
        if not warmed:
            return Health(HealthState.WARMING, True, False, "warm-up has not completed")
        return Health(HealthState.READY, True, True, None)

    def warmup(self, timeout: float | None = None) -> None:
        """Run one full batch of synthetic valid samples through the real path; then ready.

        The batch is packed and dispatched as one (whatever else is queued), run on a device
        under the watchdog, checked and unpacked like any other. Call it again to probe a
        degraded runner: a successful batch clears the degraded state.

        On a device with several shapes it also calibrates the cost model the planner compares
        shapes with: :data:`CALIBRATION_RUNS` full batches of each shape of
        ``ShapeSet.calibration_shapes()`` go through the same path, and their device times are
        fitted (:meth:`CostModel.from_timings`); see :attr:`cost_model`.

        Args:
            timeout: Deadline in seconds for the whole batch, as for :meth:`submit`.

        Raises:
            DeviceError, RequestTimeoutError, RunnerClosedError, ...: The warm-up batch failed;
                the runner does not report ready.
        """
        futures = self._dispatch_warmup(timeout)
        try:
            for future in futures:
                future.result()
        finally:
            self._end_calibration(futures)
        with self._lock:
            self._warmed_up = True

    async def warmup_async(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Async form of :meth:`warmup`."""
        futures = self._dispatch_warmup(timeout)
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            self._end_calibration(futures)
        with self._lock:
            self._warmed_up = True

    @property
    def cost_model(self) -> CostModel:
        """The estimated device time per batch shape the planner uses (calibrated by
        :meth:`warmup` on devices with several shapes; ``calibrated`` says whether it was)."""
        with self._lock:
            return self._cost

    def _dispatch_warmup(self, timeout: float | None) -> list[concurrent.futures.Future[Result]]:
        config = self._config
        # The config's shape first (the classic warm-up batch), then the calibration shapes.
        shapes: list[BatchShape | None] = [None]
        if self._shaped:
            runs = self._feeder.shapes.calibration_shapes()
            shapes += [shape for shape in runs for _ in range(CALIBRATION_RUNS)]
        futures: list[concurrent.futures.Future[Result]] = []
        batches: list[tuple[list[_Request], PackPlan]] = []
        with self._lock:
            self._require_running_locked()
            if self._shaped:
                self._timings = {}
            now = time.monotonic()
            for shape in shapes:
                rows, width = shape if shape is not None else (config.batch_size, config.seq_len)
                # Zeros are valid for every input (limits are >= 1); full-width samples fill it.
                sample = {config.dynamic_input_name: np.zeros(width, dtype=np.int32)}
                prepared = [
                    self._feeder.prepare(sample) for _ in range(min(rows, config.samples_cap))
                ]
                plan = plan_batch(
                    [p.length for p in prepared],
                    algorithm=config.algorithm,
                    batch_size=rows,
                    seq_len=width,
                    max_valid_num=config.max_valid_num,
                    lookahead=config.lookahead,
                )
                if shape is not None:
                    plan = replace(plan, shape=shape)
                requests = []
                for item in prepared:
                    future: concurrent.futures.Future[Result] = concurrent.futures.Future()
                    requests.append(self._new_request_locked(item, future, None, timeout, now))
                    futures.append(future)
                batches.append(([requests[i] for i in plan.chosen], plan))
                self._count_batch_locked(plan, "full")
        assert self._loop is not None
        for batch_requests, plan in batches:
            self._loop.call_soon_threadsafe(self._dispatch, batch_requests, plan, "full")
        return futures

    def _end_calibration(self, futures: list[concurrent.futures.Future[Result]]) -> None:
        """Stop recording device times; fit them if every warm-up batch succeeded."""
        succeeded = all(f.done() and not f.cancelled() and f.exception() is None for f in futures)
        with self._lock:
            timings, self._timings = self._timings, None
            if succeeded and timings:
                self._cost = CostModel.from_timings(timings)

    # ------------------------------------------------------------------------------ requests

    def execute(self, sample: Sample, timeout: float | None = None) -> Result:
        """Run one sample and block until its outputs are ready. Thread-safe.

        Args:
            sample: Input name -> 1-D integer array of the sample's length (``input_ids``
                required; ``token_type_ids`` defaults to zeros, ``position_ids`` to 0..L-1; a
                1-D ``attention_mask`` of ones may be given). The runner copies it.
            timeout: Deadline in seconds from now; None waits for ever (see :meth:`submit`).

        Returns:
            Output name -> array of the sample's own length (e.g. ``start_logits``).

        Raises:
            InvalidSampleError: The sample is malformed (raised before it is queued).
            OverloadedError: The queue is full.
            RunnerNotStartedError / RunnerClosedError: The runner is not running.
            RequestTimeoutError: The deadline passed; the sample was withdrawn if not yet
                packed, else its result discarded (the message says which).
            DeviceError: The device failed on this sample's batch (or no device is left).
        """
        if threading.current_thread() is self._engine_thread:
            raise RuntimeError(
                "execute() on the runner's own engine thread (e.g. inside a submit() callback) "
                "would wait for itself; use submit() there"
            )
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self._submit(sample, future, None, timeout)
        # The engine resolves every accepted request, at its deadline at the latest.
        return future.result()

    def submit(
        self, sample: Sample, *, timeout: float | None = None
    ) -> concurrent.futures.Future[Result]:
        """Submit one sample from any thread without blocking; return a concurrent future.

        For callers that are neither blocking nor on an event loop (callbacks, adapters such
        as :mod:`packrunner.compat`). The sample is validated and copied and queued before this
        returns; the future resolves on the runner's engine thread, so callbacks added with
        ``add_done_callback`` run there and must be quick. Cancelling the future withdraws the
        sample if it has not been packed yet.

        Args:
            sample: As :meth:`execute`.
            timeout: Deadline in seconds from now. If it passes before the sample is packed,
                the sample is withdrawn (it takes no slot); after packing, its result is
                discarded. Either way the future fails with
                :class:`~packrunner.RequestTimeoutError`. None: no deadline.

        Raises:
            InvalidSampleError, OverloadedError, RunnerNotStartedError, RunnerClosedError: As
                :meth:`execute`, at once.
        """
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        request = self._submit(sample, future, None, timeout)
        future.add_done_callback(partial(self._withdraw_if_cancelled, request))
        return future

    def execute_async(
        self, sample: Sample, *, timeout: float | None = None
    ) -> asyncio.Future[Result]:
        """Submit one sample now; return a future of its outputs on the calling event loop.

        ``await runner.execute_async(sample)`` is the usual form. The sample is validated and
        queued before this returns, so bad input raises here, at submit time. Returning a plain
        future rather than a coroutine spares callers a Task per request (``asyncio.gather``
        awaits futures directly), which is most of the per-request cost on the caller's side.

        Cancelling the future (or a task awaiting it) withdraws the sample if it has not been
        packed yet, so it takes no slot in a batch. ``timeout`` is a deadline as in
        :meth:`submit`. See :meth:`execute` for arguments, result and errors.

        Raises:
            RuntimeError: Called outside a running event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        request = self._submit(sample, future, loop, timeout)
        future.add_done_callback(partial(self._withdraw_if_cancelled, request))
        return future

    def _withdraw_if_cancelled(self, request: _Request, future: _AnyFuture) -> None:
        if future.cancelled():
            self._withdraw(request)
            if isinstance(future, concurrent.futures.Future):
                # A cancelled concurrent future is "done" only for result(); wait() and
                # as_completed() see it once notified, as an executor would.
                future.set_running_or_notify_cancel()

    def stats(self) -> RunnerStats:
        """A consistent snapshot of the runner's counters."""
        with self._lock:
            c = self._counters
            capacity = c.token_slots
            return RunnerStats(
                requests=c.requests,
                rejected_invalid=c.rejected_invalid,
                rejected_overloaded=c.rejected_overloaded,
                withdrawn=c.withdrawn,
                completed=c.completed,
                failed=c.failed,
                batches=c.batches,
                batches_full=c.batches_full,
                batches_timeout=c.batches_timeout,
                batches_failed=c.batches_failed,
                samples=c.samples,
                tokens=c.tokens,
                mean_samples_per_batch=c.samples / c.batches if c.batches else 0.0,
                token_fill=c.tokens / capacity if capacity else 0.0,
                queue_depth=len(self._pending),
                inflight_batches=self._inflight,
                device_busy_s=c.device_busy_s,
                latency_sum_s=c.latency_sum_s,
                queue_wait_sum_s=c.queue_wait_sum_s,
                latency_bucket_bounds_s=LATENCY_BUCKETS_S,
                latency_bucket_counts=tuple(int(n) for n in c.latency_counts),
                discarded=c.discarded,
                nonfinite=c.nonfinite,
                device_timeouts=c.device_timeouts,
                devices_replaced=c.devices_replaced,
                token_slots=c.token_slots,
            )

    def _submit(
        self,
        sample: Sample,
        future: _AnyFuture,
        loop: asyncio.AbstractEventLoop | None,
        timeout: float | None,
    ) -> _Request:
        """The one submit path: validate (into our own copy) on the caller's thread, enqueue."""
        if timeout is not None:
            if not isinstance(timeout, numbers.Real) or math.isnan(timeout):
                raise TypeError(f"timeout must be seconds or None, got {timeout!r}")
            timeout = float(timeout)
        try:
            prepared = self._feeder.prepare(sample)
        except PackRunnerError:
            with self._lock:
                self._counters.rejected_invalid += 1
            raise
        wake = False
        with self._lock:
            self._require_running_locked()
            if len(self._pending) >= self._config.max_queue_size:
                self._counters.rejected_overloaded += 1
                raise OverloadedError(
                    f"queue full: {len(self._pending)} samples waiting "
                    f"(max_queue_size={self._config.max_queue_size})"
                )
            request = self._new_request_locked(prepared, future, loop, timeout, time.monotonic())
            self._pending[request.id] = request
            self._pending_tokens += prepared.length
            # Wake the batcher when this arrival may complete a batch, or when its deadline
            # comes before the batcher's planned wake-up.
            if (
                self._wait is _Wait.ARRIVAL
                or (self._wait is _Wait.FILL and self._may_be_full_locked())
                or (timeout is not None and request.arrival + timeout < self._wake_at)
            ):
                self._wait = _Wait.BUSY
                self._wake_at = -math.inf
                wake = True
        if wake:
            self._wake_threadsafe()
        return request

    def _require_running_locked(self) -> None:
        if self._state is not _State.RUNNING:
            if self._state is _State.CREATED:
                raise RunnerNotStartedError(
                    "call start() or enter the runner's context manager first"
                )
            raise RunnerClosedError("the runner is closed")
        if self._pool.lost is not None:
            raise DeviceError(self._pool.lost)

    def _new_request_locked(
        self,
        prepared: PreparedSample,
        future: _AnyFuture,
        loop: asyncio.AbstractEventLoop | None,
        timeout: float | None,
        now: float,
    ) -> _Request:
        request = _Request(next(self._ids), prepared, now, future, loop, timeout)
        if timeout is not None:
            heapq.heappush(self._deadlines, (now + timeout, request.id, request))
        self._counters.requests += 1
        return request

    def _withdraw(self, request: _Request) -> bool:
        """Drop a request whose caller gave up, if it is still waiting to be packed."""
        with self._lock:
            if self._pending.pop(request.id, None) is None:
                return False
            self._pending_tokens -= request.sample.length
            request.settled = True
            self._counters.withdrawn += 1
            return True

    def _take_pending_locked(self) -> list[_Request]:
        taken = list(self._pending.values())
        self._pending.clear()
        self._pending_tokens = 0
        for request in taken:
            request.settled = True
        return taken

    def _expire_locked(self, now: float) -> list[tuple[_Request, BaseException]]:
        """Settle every request whose deadline has passed: withdraw it, or discard its result."""
        expired: list[tuple[_Request, BaseException]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            request = heapq.heappop(deadlines)[2]
            if request.settled:
                continue
            request.settled = True
            if self._pending.pop(request.id, None) is not None:
                self._pending_tokens -= request.sample.length
                self._counters.withdrawn += 1
                what = "before it was packed; the sample was withdrawn"
            else:
                self._counters.discarded += 1
                what = "after it was packed; its result will be discarded"
            message = f"no result within {request.timeout} s: the deadline passed {what}"
            expired.append((request, RequestTimeoutError(message)))
        return expired

    # -------------------------------------------------------------------------------- engine

    def _engine_main(self, loop_ready: threading.Event) -> None:
        loop = _new_event_loop(self._use_uvloop)
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._wakeup = asyncio.Event()
            self._pool.attach(loop, self._finish, self._on_device_change)
            loop.call_soon(loop_ready.set)
            loop.run_until_complete(self._engine())
        finally:
            self._pool.stop()
            with self._lock:
                self._state = _State.CLOSED
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _engine(self) -> None:
        try:
            await self._batcher()
        except BaseException:  # a bug; never leave callers hanging because of it
            logger.exception("packrunner batcher crashed; failing waiting samples")
            with self._lock:
                self._state = _State.CLOSING
                abandoned = self._take_pending_locked()
                self._counters.failed += len(abandoned)
            message = "internal error in the packrunner batcher"
            _deliver([(r, PackRunnerError(message)) for r in abandoned])
            # Every in-flight batch reports back on this loop (or times out); wait for them.
            assert self._wakeup is not None
            while True:
                with self._lock:
                    if self._inflight == 0:
                        return
                self._wakeup.clear()
                await self._wakeup.wait()

    def _may_be_full_locked(self) -> bool:
        # Cheap necessary condition for "some algorithm could close a batch now": fewer samples
        # than rows always fit one per row, so a batch can only be full with more samples than
        # rows, at the sample cap, or with a full batch worth of tokens.
        # With several shapes, the smallest rows and token budget any of them could fill.
        count = len(self._pending)
        return (
            count > self._full_rows
            or count >= self._config.samples_cap
            or self._pending_tokens >= self._full_tokens
        )

    async def _batcher(self) -> None:
        """Pack and dispatch batches, expire deadlines; return once closed and idle."""
        config = self._config
        timeout_s = config.timeout_us * 1e-6
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            batch_requests: list[_Request] | None = None
            plan: PackPlan | None = None
            reason = ""
            now = time.monotonic()
            wake_at = math.inf
            with self._lock:
                expired = self._expire_locked(now)
                if not self._pending:
                    if self._state is not _State.RUNNING and self._inflight == 0:
                        return
                    self._wait = _Wait.ARRIVAL
                elif self._inflight >= self._max_inflight:
                    self._wait = _Wait.DEVICE
                else:
                    draining = self._state is not _State.RUNNING
                    oldest = next(iter(self._pending.values()))
                    deadline = oldest.arrival + timeout_s
                    timed_out = now >= deadline
                    # A timed-out partial batch goes only to an idle device: while every device
                    # is busy it could not start anyway, and waiting lets it fill up.
                    due = draining or (timed_out and self._inflight < self._pool.live)
                    if due or self._may_be_full_locked():
                        candidates = list(itertools.islice(self._pending.values(), self._window))
                        planning = time.perf_counter()
                        plan = self._plan_locked([r.sample.length for r in candidates])
                        self._host_busy_s += time.perf_counter() - planning
                        if plan.full or due:
                            reason = "full" if plan.full else ("drain" if draining else "timeout")
                            batch_requests = [candidates[i] for i in plan.chosen]
                            for request in batch_requests:
                                del self._pending[request.id]
                                self._pending_tokens -= request.sample.length
                            self._count_batch_locked(plan, reason)
                    if batch_requests is None:
                        self._wait = _Wait.FILL
                        if not timed_out:
                            wake_at = deadline
                if batch_requests is None:
                    if self._deadlines:
                        wake_at = min(wake_at, self._deadlines[0][0])
                    self._wake_at = wake_at
                else:
                    self._wake_at = -math.inf
            if expired:
                _deliver(expired)
            if batch_requests is not None:
                assert plan is not None
                self._dispatch(batch_requests, plan, reason)
                continue
            if wake_at == math.inf:
                await self._wakeup.wait()
            else:
                try:
                    async with asyncio.timeout(max(0.0, wake_at - time.monotonic())):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    def _plan_locked(self, lengths: list[int]) -> PackPlan:
        config = self._config
        if self._shaped:
            cost = self._cost
            host_s = self._host_busy_s / max(1, self._counters.batches)
            return plan_shaped(
                lengths,
                algorithm=config.algorithm,
                shapes=self._feeder.shapes,
                cost=lambda shape: cost.estimate(shape) + host_s,
                max_valid_num=config.max_valid_num,
                lookahead=config.lookahead,
            )
        return plan_batch(
            lengths,
            algorithm=config.algorithm,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            max_valid_num=config.max_valid_num,
            lookahead=config.lookahead,
        )

    def _count_batch_locked(self, plan: PackPlan, reason: str) -> None:
        self._inflight += 1
        counters = self._counters
        counters.batches += 1
        counters.samples += plan.num_samples
        counters.tokens += plan.num_tokens
        rows, width = self._feeder.shape_of(plan)
        counters.token_slots += rows * width
        if reason == "full":
            counters.batches_full += 1
        elif reason == "timeout":
            counters.batches_timeout += 1

    def _dispatch(self, requests: list[_Request], plan: PackPlan, reason: str) -> None:
        batch = Batch(requests, plan, {}, reason, time.monotonic())
        started = time.perf_counter()
        try:
            batch.feeds = self._feeder.feeds(plan, [r.sample for r in requests])
        except Exception as exc:  # a bug in packing: fail this batch only
            logger.exception("packing a batch failed")
            batch.claimed = True
            self._finish(batch, None, exc, 0.0)
            return
        if self._shaped:
            with self._lock:
                self._host_busy_s += time.perf_counter() - started
        self._pool.run(batch)

    def _finish(
        self,
        batch: Batch,
        outputs: object,
        error: BaseException | None,
        busy_s: float,
    ) -> None:
        """Engine thread: a batch came back from a device (or its watchdog fired): deliver."""
        requests: list[_Request] = batch.requests
        count = len(requests)
        outcomes: list[_Outcome]
        cutting = time.perf_counter()
        if error is None:
            try:
                outcomes = list(self._feeder.results(batch.plan, outputs))
            except Exception as exc:  # outputs that do not match the specs
                error = exc
        cutting_s = time.perf_counter() - cutting
        if error is not None:
            if isinstance(error, DeviceTimeoutError):
                failure: type[DeviceError] = DeviceTimeoutError
                message = str(error)
            else:
                failure = DeviceError
                message = f"device failed on a batch of {count} samples: {short_repr(error, 300)}"
            outcomes = [_chained(failure(message), error) for _ in requests]
        nonfinite = 0
        if error is None and self._config.check_finite:
            for k, outcome in enumerate(outcomes):
                if not isinstance(outcome, BaseException) and not _all_finite(outcome):
                    outcomes[k] = DeviceError("the device returned NaN or Inf for this sample")
                    nonfinite += 1
        # Request latency (arrival to delivery) and queue wait (arrival to packing), as a
        # histogram: a few numpy calls per batch, none per request.
        now = time.monotonic()
        arrivals = np.fromiter((r.arrival for r in requests), np.float64, count)
        latencies = now - arrivals
        buckets = np.bincount(
            np.searchsorted(_LATENCY_BOUNDS, latencies), minlength=len(_LATENCY_BOUNDS) + 1
        )
        deliveries: list[tuple[_Request, _Outcome]] = []
        with self._lock:
            self._inflight -= 1
            counters = self._counters
            counters.device_busy_s += busy_s
            counters.latency_counts += buckets
            counters.latency_sum_s += float(latencies.sum())
            counters.queue_wait_sum_s += float((batch.packed_at - arrivals).sum())
            counters.nonfinite += nonfinite
            self._host_busy_s += cutting_s
            if error is None:
                self._degraded = None
                if self._timings is not None:  # calibrating: every batch's time counts
                    shape = self._feeder.shape_of(batch.plan)
                    self._timings.setdefault(shape, []).append(busy_s)
            else:
                counters.batches_failed += 1
                counters.device_timeouts += isinstance(error, DeviceTimeoutError)
                self._degraded = f"the last batch failed: {short_repr(error, 200)}"
            for request, outcome in zip(requests, outcomes, strict=True):
                if request.settled:  # its deadline passed while it was on the device
                    continue
                request.settled = True
                if isinstance(outcome, BaseException):
                    counters.failed += 1
                else:
                    counters.completed += 1
                deliveries.append((request, outcome))
        _deliver(deliveries)
        assert self._wakeup is not None
        self._wakeup.set()

    def _on_device_change(self, replaced: bool) -> None:
        """Engine thread: a device was replaced, or lost for good."""
        abandoned: list[_Request] = []
        with self._lock:
            if replaced:
                self._counters.devices_replaced += 1
            elif self._pool.lost is not None:
                abandoned = self._take_pending_locked()
                self._counters.failed += len(abandoned)
            lost = self._pool.lost
        if abandoned and lost is not None:
            _deliver([(r, DeviceError(lost)) for r in abandoned])
        assert self._wakeup is not None
        self._wakeup.set()

    def _wake_threadsafe(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # loop already closed: the engine has finished
                pass


# ---------------------------------------------------------------------------------- delivery


def _chained(error: BaseException, cause: BaseException) -> BaseException:
    # One instance per future, all chained to the shared root cause: re-raising one cannot
    # grow another's traceback (nor keep its caller's frames alive).
    if error is not cause:
        error.__cause__ = cause
    return error


def _all_finite(result: Result) -> bool:
    return all(
        bool(np.isfinite(array).all()) for array in result.values() if array.dtype.kind in "fc"
    )


def _deliver(items: Sequence[tuple[_Request, _Outcome]]) -> None:
    """Resolve futures: sync ones directly, async ones with one hop per caller loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_AnyFuture, _Outcome]]] = defaultdict(list)
    for request, outcome in items:
        if request.loop is None:
            _resolve(request.future, outcome)
        else:
            by_loop[request.loop].append((request.future, outcome))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, group)
        except RuntimeError:
            # The caller's loop is closed: nobody can await these futures any more.
            logger.debug("dropping %d results for a closed event loop", len(group))


def _resolve_all(group: list[tuple[_AnyFuture, _Outcome]]) -> None:
    for future, outcome in group:
        _resolve(future, outcome)


def _resolve(future: _AnyFuture, outcome: _Outcome) -> None:
    """Set one future. A done-callback that raises, even a BaseException, is logged and
    cannot keep the other futures of its batch unresolved nor stop the engine thread."""
    try:
        if future.done():  # cancelled by its caller
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        pass  # cancelled by its caller meanwhile
    except BaseException:
        logger.exception("a done-callback of a packrunner future raised; ignored")


def _new_event_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
