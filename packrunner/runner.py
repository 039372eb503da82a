"""PackRunner: the engine and its thin blocking / asyncio entry points.

Ownership model (the invariant the rest of the code relies on):

* **Caller threads** (any number, any event loop) only validate their sample and append it to the
  pending queue under ``_lock``. ``execute`` and ``execute_async`` share this one submit path.
* **The engine thread** runs the runner's own private event loop (uvloop when installed). The
  batching coroutine is the only code that plans, packs and unpacks batches and that resolves
  futures; it sleeps on an event until an arrival, a deadline or a finished batch needs it.
* **One worker thread per device** owns that device: it alone calls ``open``/``run``/``close``.

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
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from packrunner._codec import BatchFeeder, PreparedSample
from packrunner.config import RunnerConfig
from packrunner.devices.base import Device
from packrunner.errors import (
    ConfigError,
    DeviceError,
    OverloadedError,
    PackRunnerError,
    RequestTimeoutError,
    RunnerClosedError,
    RunnerNotStartedError,
)
from packrunner.packing import PackPlan, plan_batch, unpack_outputs
from packrunner.stats import RunnerStats

__all__ = ["LATENCY_BUCKETS_S", "PackRunner", "Result"]

#: Upper bounds (seconds, inclusive) of the request-latency histogram in :class:`RunnerStats`.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_LATENCY_BOUNDS = np.array(LATENCY_BUCKETS_S)

logger = logging.getLogger("packrunner")

#: One sample's outputs: output name -> array whose first dim is the sample's length.
Result = dict[str, npt.NDArray[Any]]
Sample = Mapping[str, Any]

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


@dataclass(slots=True, eq=False)
class _Batch:
    requests: list[_Request]
    plan: PackPlan
    feeds: dict[str, npt.NDArray[Any]]
    reason: str  # "full" | "timeout" | "drain"
    packed_at: float = 0.0  # monotonic time the batch was formed


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    rejected_invalid: int = 0
    rejected_overloaded: int = 0
    withdrawn: int = 0
    completed: int = 0
    failed: int = 0
    batches: int = 0
    batches_full: int = 0
    batches_timeout: int = 0
    batches_failed: int = 0
    samples: int = 0
    tokens: int = 0
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
        self._inflight = 0
        self._wait = _Wait.BUSY
        self._ids = itertools.count()
        self._counters = _Counters()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._engine_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._work: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()

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
        opened: list[concurrent.futures.Future[None]] = []
        for number, device in enumerate(self._devices):
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            worker = threading.Thread(
                target=self._worker_main,
                args=(device, ready),
                name=f"packrunner-device-{number}",
                daemon=True,
            )
            worker.start()
            self._workers.append(worker)
            opened.append(ready)
        failures = [f.exception() for f in opened if f.exception() is not None]
        if failures:
            self._stop_workers()
            with self._lock:
                self._state = _State.CLOSED
            raise DeviceError(f"device failed to open: {failures[0]!r}") from failures[0]

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
        """Stop accepting samples and shut down; no future is left pending, no thread running.

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
                    abandoned = list(self._pending.values())
                    self._pending.clear()
                    self._pending_tokens = 0
                    self._counters.failed += len(abandoned)
        if abandoned:
            error = RunnerClosedError("the runner was closed before this sample was packed")
            _deliver_errors(abandoned, error)
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

    # ------------------------------------------------------------------------------ requests

    def execute(self, sample: Sample, timeout: float | None = None) -> Result:
        """Run one sample and block until its outputs are ready. Thread-safe.

        Args:
            sample: Input name -> 1-D integer array of the sample's length (``input_ids``
                required; ``token_type_ids`` defaults to zeros, ``position_ids`` to 0..L-1; a
                1-D ``attention_mask`` of ones may be given).
            timeout: Seconds to wait; None waits for ever.

        Returns:
            Output name -> array of the sample's own length (e.g. ``start_logits``).

        Raises:
            InvalidSampleError: The sample is malformed (raised before it is queued).
            OverloadedError: The queue is full.
            RunnerNotStartedError / RunnerClosedError: The runner is not running.
            RequestTimeoutError: ``timeout`` expired; the sample is withdrawn if not yet packed.
            DeviceError: The device failed on this sample's batch.
        """
        if threading.current_thread() is self._engine_thread:
            raise RuntimeError(
                "execute() on the runner's own engine thread (e.g. inside a submit() callback) "
                "would wait for itself; use submit() there"
            )
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        request = self._submit(sample, future, None)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()
            withdrawn = self._withdraw(request)
            future.cancel()
            state = "before it was packed" if withdrawn else "after it was packed"
            raise RequestTimeoutError(
                f"no result within {timeout} s; the sample was withdrawn {state}"
            ) from None

    def submit(self, sample: Sample) -> concurrent.futures.Future[Result]:
        """Submit one sample from any thread without blocking; return a concurrent future.

        For callers that are neither blocking nor on an event loop (callbacks, adapters such
        as :mod:`packrunner.compat`). The sample is validated and queued before this returns;
        the future resolves on the runner's engine thread, so callbacks added with
        ``add_done_callback`` run there and must be quick. Cancelling the future withdraws the
        sample if it has not been packed yet.

        Raises:
            InvalidSampleError, OverloadedError, RunnerNotStartedError, RunnerClosedError: As
                :meth:`execute`, at once.
        """
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        request = self._submit(sample, future, None)
        future.add_done_callback(partial(self._withdraw_if_cancelled, request))
        return future

    def execute_async(self, sample: Sample) -> asyncio.Future[Result]:
        """Submit one sample now; return a future of its outputs on the calling event loop.

        ``await runner.execute_async(sample)`` is the usual form. The sample is validated and
        queued before this returns, so bad input raises here, at submit time. Returning a plain
        future rather than a coroutine spares callers a Task per request (``asyncio.gather``
        awaits futures directly), which is most of the per-request cost on the caller's side.

        Cancelling the future (or a task awaiting it) withdraws the sample if it has not been
        packed yet, so it takes no slot in a batch. See :meth:`execute` for arguments, result
        and errors.

        Raises:
            RuntimeError: Called outside a running event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        request = self._submit(sample, future, loop)
        future.add_done_callback(partial(self._withdraw_if_cancelled, request))
        return future

    def _withdraw_if_cancelled(self, request: _Request, future: _AnyFuture) -> None:
        if future.cancelled():
            self._withdraw(request)

    def stats(self) -> RunnerStats:
        """A consistent snapshot of the runner's counters."""
        config = self._config
        with self._lock:
            c = self._counters
            capacity = c.batches * config.batch_size * config.seq_len
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
            )

    def _submit(
        self, sample: Sample, future: _AnyFuture, loop: asyncio.AbstractEventLoop | None
    ) -> _Request:
        """The one submit path: validate on the caller's thread, then enqueue."""
        try:
            prepared = self._feeder.prepare(sample)
        except PackRunnerError:
            with self._lock:
                self._counters.rejected_invalid += 1
            raise
        wake = False
        with self._lock:
            if self._state is not _State.RUNNING:
                if self._state is _State.CREATED:
                    raise RunnerNotStartedError(
                        "call start() or enter the runner's context manager first"
                    )
                raise RunnerClosedError("the runner is closed")
            if len(self._pending) >= self._config.max_queue_size:
                self._counters.rejected_overloaded += 1
                raise OverloadedError(
                    f"queue full: {len(self._pending)} samples waiting "
                    f"(max_queue_size={self._config.max_queue_size})"
                )
            request = _Request(next(self._ids), prepared, time.monotonic(), future, loop)
            self._pending[request.id] = request
            self._pending_tokens += prepared.length
            self._counters.requests += 1
            if self._wait is _Wait.ARRIVAL or (
                self._wait is _Wait.FILL and self._may_be_full_locked()
            ):
                self._wait = _Wait.BUSY
                wake = True
        if wake:
            self._wake_threadsafe()
        return request

    def _withdraw(self, request: _Request) -> bool:
        """Drop a request whose caller gave up, if it is still waiting to be packed."""
        with self._lock:
            if self._pending.pop(request.id, None) is None:
                return False
            self._pending_tokens -= request.sample.length
            self._counters.withdrawn += 1
            return True

    # -------------------------------------------------------------------------------- engine

    def _engine_main(self, loop_ready: threading.Event) -> None:
        loop = _new_event_loop(self._use_uvloop)
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._wakeup = asyncio.Event()
            loop.call_soon(loop_ready.set)
            loop.run_until_complete(self._engine())
        finally:
            self._stop_workers()
            with self._lock:
                self._state = _State.CLOSED
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _engine(self) -> None:
        try:
            await self._batcher()
        except Exception:  # a bug; never leave callers hanging because of it
            logger.exception("packrunner batcher crashed; failing waiting samples")
            with self._lock:
                self._state = _State.CLOSING
                abandoned = list(self._pending.values())
                self._pending.clear()
                self._pending_tokens = 0
                self._counters.failed += len(abandoned)
            _deliver_errors(abandoned, PackRunnerError("internal error in the packrunner batcher"))
        # Every in-flight batch reports back on this loop; wait for them before stopping.
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
        count = len(self._pending)
        return (
            count > self._config.batch_size
            or count >= self._config.samples_cap
            or self._pending_tokens >= self._config.capacity_tokens
        )

    async def _batcher(self) -> None:
        config = self._config
        timeout_s = config.timeout_us * 1e-6
        workers = len(self._devices)
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            batch_requests: list[_Request] | None = None
            plan: PackPlan | None = None
            reason = ""
            sleep_s: float | None = None
            with self._lock:
                if not self._pending:
                    if self._state is not _State.RUNNING:
                        return
                    self._wait = _Wait.ARRIVAL
                elif self._inflight >= self._max_inflight:
                    self._wait = _Wait.DEVICE
                else:
                    draining = self._state is not _State.RUNNING
                    oldest = next(iter(self._pending.values()))
                    deadline = oldest.arrival + timeout_s
                    now = time.monotonic()
                    expired = now >= deadline
                    # A timed-out partial batch goes only to an idle device: while every device
                    # is busy it could not start anyway, and waiting lets it fill up.
                    due = draining or (expired and self._inflight < workers)
                    if due or self._may_be_full_locked():
                        candidates = list(itertools.islice(self._pending.values(), self._window))
                        plan = plan_batch(
                            [r.sample.length for r in candidates],
                            algorithm=config.algorithm,
                            batch_size=config.batch_size,
                            seq_len=config.seq_len,
                            max_valid_num=config.max_valid_num,
                            lookahead=config.lookahead,
                        )
                        if plan.full or due:
                            reason = "full" if plan.full else ("drain" if draining else "timeout")
                            batch_requests = [candidates[i] for i in plan.chosen]
                            for request in batch_requests:
                                del self._pending[request.id]
                                self._pending_tokens -= request.sample.length
                            self._inflight += 1
                            counters = self._counters
                            counters.batches += 1
                            counters.samples += plan.num_samples
                            counters.tokens += plan.num_tokens
                            if reason == "full":
                                counters.batches_full += 1
                            elif reason == "timeout":
                                counters.batches_timeout += 1
                    if batch_requests is None:
                        self._wait = _Wait.FILL
                        sleep_s = None if expired else deadline - now
            if batch_requests is not None:
                assert plan is not None
                self._dispatch(batch_requests, plan, reason)
                continue
            if sleep_s is None:
                await self._wakeup.wait()
            else:
                try:
                    async with asyncio.timeout(sleep_s):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass

    def _dispatch(self, requests: list[_Request], plan: PackPlan, reason: str) -> None:
        try:
            feeds = self._feeder.feeds(plan, [r.sample for r in requests])
        except Exception as exc:  # a bug in packing: fail this batch only
            logger.exception("packing a batch failed")
            self._finish(_Batch(requests, plan, {}, reason, time.monotonic()), None, exc, 0.0)
            return
        self._work.put(_Batch(requests, plan, feeds, reason, time.monotonic()))

    def _finish(
        self,
        batch: _Batch,
        outputs: dict[str, npt.NDArray[Any]] | None,
        error: BaseException | None,
        busy_s: float,
    ) -> None:
        """Runs on the engine loop when a device finished a batch: unpack and deliver."""
        results: list[Result] | None = None
        if error is None and outputs is not None:
            try:
                results = unpack_outputs(
                    batch.plan, outputs, self._feeder.outputs, seq_len=self._config.seq_len
                )
            except Exception as exc:
                error = exc
        # Request latency (arrival to delivery) and queue wait (arrival to packing), as a
        # histogram: a few numpy calls per batch, none per request.
        now = time.monotonic()
        arrivals = np.fromiter((r.arrival for r in batch.requests), np.float64, len(batch.requests))
        latencies = now - arrivals
        buckets = np.bincount(
            np.searchsorted(_LATENCY_BOUNDS, latencies), minlength=len(_LATENCY_BOUNDS) + 1
        )
        with self._lock:
            self._inflight -= 1
            self._counters.device_busy_s += busy_s
            self._counters.latency_counts += buckets
            self._counters.latency_sum_s += float(latencies.sum())
            self._counters.queue_wait_sum_s += float((batch.packed_at - arrivals).sum())
            if results is None:
                self._counters.batches_failed += 1
                self._counters.failed += len(batch.requests)
            else:
                self._counters.completed += len(batch.requests)
        if results is None:
            failure = DeviceError(
                f"device failed on a batch of {len(batch.requests)} samples: {error!r}"
            )
            failure.__cause__ = error
            _deliver_errors(batch.requests, failure)
        else:
            _deliver_results(batch.requests, results)
        assert self._wakeup is not None
        self._wakeup.set()

    def _wake_threadsafe(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # loop already closed: the engine has finished
                pass

    # ------------------------------------------------------------------------------- workers

    def _worker_main(self, device: Device, ready: concurrent.futures.Future[None]) -> None:
        try:
            device.open()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                batch = self._work.get()
                if batch is None:
                    return
                started = time.perf_counter()
                outputs: dict[str, npt.NDArray[Any]] | None = None
                error: BaseException | None = None
                try:
                    outputs = device.run(batch.feeds)
                except Exception as exc:
                    error = exc
                busy_s = time.perf_counter() - started
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._finish, batch, outputs, error, busy_s)
        finally:
            try:
                device.close()
            except Exception:
                logger.exception("closing device %r failed", device)

    def _stop_workers(self) -> None:
        for _ in self._workers:
            self._work.put(None)
        for worker in self._workers:
            worker.join()


# ---------------------------------------------------------------------------------- delivery


def _deliver_results(requests: Sequence[_Request], results: Sequence[Result]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_AnyFuture, Result]]] = defaultdict(list)
    for request, result in zip(requests, results, strict=True):
        if request.loop is None:
            _set_sync(request.future, result, None)
        else:
            by_loop[request.loop].append((request.future, result))
    for loop, items in by_loop.items():
        _call_in_loop(loop, _resolve_async, items, None)


def _deliver_errors(requests: Sequence[_Request], error: BaseException) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_AnyFuture, Result]]] = defaultdict(list)
    for request in requests:
        if request.loop is None:
            _set_sync(request.future, None, error)
        else:
            by_loop[request.loop].append((request.future, {}))
    for loop, items in by_loop.items():
        _call_in_loop(loop, _resolve_async, items, error)


def _call_in_loop(
    loop: asyncio.AbstractEventLoop,
    callback: Callable[[list[tuple[_AnyFuture, Result]], BaseException | None], None],
    items: list[tuple[_AnyFuture, Result]],
    error: BaseException | None,
) -> None:
    try:
        loop.call_soon_threadsafe(callback, items, error)
    except RuntimeError:
        # The caller's loop is closed: nobody can await these futures any more.
        logger.debug("dropping %d results for a closed event loop", len(items))


def _resolve_async(items: list[tuple[_AnyFuture, Result]], error: BaseException | None) -> None:
    for future, result in items:
        if future.done():  # cancelled by its caller
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _set_sync(future: _AnyFuture, result: Result | None, error: BaseException | None) -> None:
    try:
        if error is None:
            assert result is not None
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by a caller whose timeout expired


def _new_event_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
