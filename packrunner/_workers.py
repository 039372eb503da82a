"""Device worker threads and their watchdog.

One worker thread per device owns it (``open``, ``run``, ``close``). Dispatched batches go
through one shared work queue to whichever worker is free. Each dispatched batch has a timer on
the engine loop (``loop.call_later``, no polling): if its device has not returned
``device_timeout_s`` after it *started* the batch, the batch fails with
:class:`~packrunner.DeviceTimeoutError`, the worker thread (which may never come back) is
abandoned, and a replacement device is opened on a new worker thread through
:meth:`Device.replica`. When a device cannot be replaced the runner keeps serving on the others;
when none is left, :attr:`WorkerPool.lost` says why and every queued batch fails at once.

Who decides a batch's outcome: the worker that finishes it or the watchdog that gives up on
it, whichever first claims it (``Batch.claimed``, under the runner's lock). A worker that finds
its batch claimed by the watchdog leaves without reporting: it has been replaced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from packrunner.devices.base import Device
from packrunner.errors import DeviceError, DeviceTimeoutError
from packrunner.packing import PackPlan

__all__ = ["Batch", "WorkerPool"]

logger = logging.getLogger("packrunner")

#: Engine-thread callback for a batch's outcome: (batch, outputs, error, busy seconds).
FinishCallback = Callable[["Batch", object, BaseException | None, float], None]


@dataclass(slots=True, eq=False)
class _Worker:
    number: int
    thread: threading.Thread | None = None
    device: Device | None = None  # set by its thread once created and opened
    abandoned: bool = False  # under the lock: stuck in run(); not stopped, not joined


@dataclass(slots=True, eq=False)
class Batch:
    """One packed batch on its way through a device."""

    requests: list[Any]  # the runner's requests, in slot order
    plan: PackPlan
    feeds: dict[str, npt.NDArray[Any]]
    reason: str  # "full" | "timeout" | "drain"
    packed_at: float  # monotonic time the batch was formed
    claimed: bool = False  # under the lock: its outcome is being delivered
    worker: _Worker | None = None  # under the lock: who runs it, once started
    started_at: float | None = None  # under the lock: monotonic start on the device
    watchdog: asyncio.TimerHandle | None = None  # engine thread


class WorkerPool:
    """The device worker threads, the work queue and the per-batch watchdog.

    Args:
        lock: The runner's lock (guards ``live``, ``lost`` and the batches' claim fields).
        timeout_s: ``device_timeout_s``; None disables the watchdog.
    """

    def __init__(self, lock: threading.Lock, timeout_s: float | None) -> None:
        self._lock = lock
        self._timeout_s = timeout_s
        self._work: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._numbers = itertools.count()
        self._replacing = 0
        self._dispatched: set[Batch] = set()  # engine thread: not yet reported
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finish: FinishCallback | None = None
        self._on_change: Callable[[bool], None] | None = None
        #: Workers with an open device that are not abandoned (under the lock).
        self.live = 0
        #: Why no working device is left, or None (under the lock).
        self.lost: str | None = None

    def open(self, devices: Sequence[Device]) -> BaseException | None:
        """Start one worker per device and wait until each opened it; the first failure."""
        opened: list[concurrent.futures.Future[None]] = []
        for device in devices:
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._spawn(_existing(device), ready)
            opened.append(ready)
        failures = [f.exception() for f in opened if f.exception() is not None]
        if failures:
            return failures[0]
        with self._lock:
            self.live = len(devices)
        return None

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        finish: FinishCallback,
        on_change: Callable[[bool], None],
    ) -> None:
        """Report to the engine ``loop``: batch outcomes to ``finish``; ``on_change(True)``
        when a device was replaced, ``on_change(False)`` when one was lost for good."""
        self._loop, self._finish, self._on_change = loop, finish, on_change

    def run(self, batch: Batch) -> None:
        """Engine thread: queue ``batch`` for the next free device, under the watchdog."""
        self._dispatched.add(batch)
        self._arm(batch, self._timeout_s)
        self._work.put(batch)

    def stop(self) -> None:
        """Stop and join the workers that are not abandoned (each within the timeout)."""
        with self._lock:
            workers = [w for w in self._workers if not w.abandoned]
        for _ in workers:
            self._work.put(None)
        for worker in workers:
            assert worker.thread is not None
            worker.thread.join(self._timeout_s)
            if worker.thread.is_alive():
                logger.error("device worker %s did not stop; abandoning it", worker.number)

    # ------------------------------------------------------------------------------ watchdog

    def _arm(self, batch: Batch, delay: float | None) -> None:
        if delay is not None:
            assert self._loop is not None
            batch.watchdog = self._loop.call_later(delay, self._check, batch)

    def _check(self, batch: Batch) -> None:
        """Engine thread: a batch's timer fired."""
        timeout_s = self._timeout_s
        assert timeout_s is not None
        now = time.monotonic()
        replace: Device | None = None
        with self._lock:
            if batch.claimed:
                return
            started = batch.started_at
            if started is None:  # still queued (behind a slow or hung batch)
                if self.live or self._replacing:
                    self._arm(batch, timeout_s)
                    return
                batch.claimed = True
                error: DeviceError = DeviceError(self.lost or "no working device left")
            elif now < started + timeout_s:
                self._arm(batch, started + timeout_s - now)
                return
            else:
                batch.claimed = True
                worker = batch.worker
                assert worker is not None
                worker.abandoned = True
                self.live -= 1
                replace = worker.device
                if replace is not None:
                    self._replacing += 1
                error = DeviceTimeoutError(
                    f"the device did not finish a batch of {len(batch.requests)} samples within "
                    f"device_timeout_s={timeout_s} s; its worker thread was abandoned"
                )
        if replace is not None:
            logger.error("device %r hung; opening a replacement", replace)
            self._spawn(replace.replica, None)
        self._report(batch, None, error, 0.0 if started is None else now - started)

    def _replacement_done(self, worker: _Worker, error: BaseException | None) -> None:
        """Engine thread: a replacement device opened, or could not be made."""
        with self._lock:
            self._replacing -= 1
            if error is None:
                self.live += 1
        assert self._on_change is not None
        if error is None:
            self._on_change(True)
            return
        logger.error("could not replace a hung device: %r", error)
        with self._lock:
            if self.live or self._replacing or self.lost is not None:
                return
            self.lost = (
                f"no working device left (the last one hung; replacing it failed: {error!r})"
            )
            queued = [b for b in self._dispatched if not b.claimed]
            for batch in queued:
                batch.claimed = True
            lost = self.lost
        for batch in queued:
            self._report(batch, None, DeviceError(lost), 0.0)
        self._on_change(False)

    def _report(
        self, batch: Batch, outputs: object, error: BaseException | None, busy_s: float
    ) -> None:
        """Engine thread: the one way a claimed batch's outcome reaches the runner."""
        if batch.watchdog is not None:
            batch.watchdog.cancel()
        self._dispatched.discard(batch)
        assert self._finish is not None
        self._finish(batch, outputs, error, busy_s)

    # ------------------------------------------------------------------------------- workers

    def _spawn(
        self,
        make_device: Callable[[], Device | None],
        ready: concurrent.futures.Future[None] | None,
    ) -> None:
        worker = _Worker(next(self._numbers))
        worker.thread = threading.Thread(
            target=self._main,
            args=(worker, make_device, ready),
            name=f"packrunner-device-{worker.number}",
            daemon=True,  # an abandoned (hung) worker must not keep the process alive
        )
        with self._lock:
            self._workers.append(worker)
        worker.thread.start()

    def _post(self, callback: Callable[..., None], *args: object) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the engine loop is closed: nobody is listening any more
            return False
        return True

    def _main(
        self,
        worker: _Worker,
        make_device: Callable[[], Device | None],
        ready: concurrent.futures.Future[None] | None,
    ) -> None:
        try:
            device = make_device()
            if device is None:
                raise DeviceError("the device cannot be replaced (Device.replica() is None)")
            device.open()
        except BaseException as exc:
            if ready is not None:
                ready.set_exception(exc)
            else:
                self._post(self._replacement_done, worker, exc)
            return
        worker.device = device
        if ready is not None:
            ready.set_result(None)
        elif not self._post(self._replacement_done, worker, None):
            device.close()
            return
        try:
            self._serve(worker, device)
        finally:
            try:
                device.close()
            except BaseException:
                logger.exception("closing device %r failed", device)

    def _serve(self, worker: _Worker, device: Device) -> None:
        while True:
            batch = self._work.get()
            if batch is None:
                return
            with self._lock:
                if batch.claimed:  # failed while queued (no device was left)
                    continue
                batch.worker = worker
                batch.started_at = time.monotonic()
            started = time.perf_counter()
            outputs: object = None
            error: BaseException | None = None
            try:
                outputs = device.run(batch.feeds)
            except BaseException as exc:  # even CancelledError / KeyboardInterrupt / SystemExit
                error = exc
            busy_s = time.perf_counter() - started
            with self._lock:
                if batch.claimed:  # the watchdog gave up on this worker; it was replaced
                    return
                batch.claimed = True
            if not self._post(self._report, batch, outputs, error, busy_s):
                return


def _existing(device: Device) -> Callable[[], Device]:
    """A device factory for a device that already exists."""
    return lambda: device
