"""Seeded chaos: many caller threads and loops, cancels, deadlines, bad inputs, faulty devices.

Asserts exactly-once resolution, zero wrong successes (every result is compared with the exact
single-sample reference), typed errors only, nothing stranded and no thread left behind.
A few seconds by default; ``PACKRUNNER_CHAOS_SECONDS=60`` for a longer run and
``PACKRUNNER_CHAOS_SEED`` for another schedule. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from packrunner import (
    InvalidSampleError,
    OverloadedError,
    PackRunner,
    PackRunnerError,
    RunnerConfig,
)
from tests._support import FAULTS, FaultPlan, FaultyDevice, reference

SECONDS = float(os.environ.get("PACKRUNNER_CHAOS_SECONDS", "3"))
#: However slow the machine, the run lasts until every fault kind was injected this many times
#: (they are forced first, in a seeded order), but never longer than MAX_SECONDS.
EACH_FAULT = 2
MAX_SECONDS = max(60.0, 2 * SECONDS)
SEED = int(os.environ.get("PACKRUNNER_CHAOS_SEED", "20251202"))
SHAPE: dict[str, Any] = {"batch_size": 4, "seq_len": 16}
BAD_SAMPLES: list[object] = [
    {"input_ids": np.array([1, -1], np.int8)},
    {"input_ids": np.array([5, 1000], ">i4")},
    {"input_ids": np.ma.masked_array([1, 2], mask=[False, True])},
    {"input_ids": [1.5]},
    {"input_ids": []},
    {"input_ids": list(range(1, 18))},
    {"input_ids": [1], "bogus": [1]},
    {"input_ids": [1, 2], "token_type_ids": [0, 2]},
    "not a mapping",
]


@dataclass
class Tally:
    """What the callers saw (merged under a lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong_successes: int = 0
    untyped_errors: list[BaseException] = field(default_factory=list)
    resolutions: dict[int, int] = field(default_factory=dict)
    futures: list[concurrent.futures.Future[Any] | asyncio.Future[Any]] = field(
        default_factory=list
    )

    def bump(self, kind: str) -> None:
        with self.lock:
            self.outcomes[kind] += 1

    def track(self, future: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> None:
        key = id(future)
        with self.lock:
            self.resolutions[key] = 0
            self.futures.append(future)

        def count(_: object) -> None:
            with self.lock:
                self.resolutions[key] += 1

        future.add_done_callback(count)

    def record(self, sample: Any, future: Any, cancelled: bool) -> None:
        if future.cancelled():
            kind = "cancelled"
        elif future.exception() is not None:
            error = future.exception()
            kind = type(error).__name__
            if not isinstance(error, PackRunnerError):
                with self.lock:
                    self.untyped_errors.append(error)
        else:
            kind = "success"
            expected = reference(sample)
            result = future.result()
            wrong = set(result) != set(expected) or any(
                not np.array_equal(result[name], value, equal_nan=False)
                for name, value in expected.items()
            )
            if wrong:
                with self.lock:
                    self.wrong_successes += 1
        with self.lock:
            self.outcomes[kind] += 1


def random_sample(rng: np.random.Generator) -> dict[str, Any]:
    length = int(rng.integers(1, 17))
    sample: dict[str, Any] = {"input_ids": rng.integers(0, 1000, length).astype(np.int32)}
    if rng.random() < 0.5:
        sample["token_type_ids"] = rng.integers(0, 2, length)
    return sample


class Clock:
    """When the callers stop: after SECONDS and once every forced fault was injected."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.start = time.monotonic()

    def done(self) -> bool:
        elapsed = time.monotonic() - self.start
        if elapsed >= MAX_SECONDS:
            return True
        with self.plan.lock:
            forced_left = len(self.plan.forced)
        return elapsed >= SECONDS and forced_left == 0


def thread_caller(
    runner: PackRunner, tally: Tally, seed: int, clock: Clock, waits: list[Any]
) -> None:
    rng = np.random.default_rng(seed)
    while not clock.done():
        action = rng.random()
        if action < 0.1:
            try:
                runner.submit(BAD_SAMPLES[int(rng.integers(len(BAD_SAMPLES)))])  # type: ignore[arg-type]
            except InvalidSampleError:
                tally.bump("invalid")
            continue
        sample = random_sample(rng)
        timeout = None if rng.random() < 0.5 else float(rng.uniform(0.0, 0.05))
        try:
            if action < 0.2:
                try:
                    result = runner.execute(sample, timeout=timeout)
                except PackRunnerError as error:
                    if isinstance(error, OverloadedError):
                        tally.bump("overloaded")
                        continue
                    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
                    done.set_exception(error)
                else:
                    done = concurrent.futures.Future()
                    done.set_result(result)
                tally.record(sample, done, cancelled=False)
                continue
            future = runner.submit(sample, timeout=timeout)
        except OverloadedError:
            tally.bump("overloaded")
            if waits:  # back-pressure: wait for our oldest request before trying again
                concurrent.futures.wait([waits[0][1]], timeout=30)
            continue
        tally.track(future)
        cancel = rng.random() < 0.1
        if cancel:
            future.cancel()
        waits.append((sample, future, cancel))
        if len(waits) > 16:  # keep a few requests outstanding per caller
            old_sample, old_future, old_cancel = waits.pop(0)
            concurrent.futures.wait([old_future], timeout=30)
            if old_future.done():
                tally.record(old_sample, old_future, old_cancel)


def loop_caller(runner: PackRunner, tally: Tally, seed: int, clock: Clock) -> None:
    async def main() -> None:
        rng = np.random.default_rng(seed)
        pending: list[tuple[Any, asyncio.Future[Any], bool]] = []
        while not clock.done():
            sample = random_sample(rng)
            timeout = None if rng.random() < 0.5 else float(rng.uniform(0.0, 0.05))
            try:
                future = runner.execute_async(sample, timeout=timeout)
            except OverloadedError:
                tally.bump("overloaded")
                # Back-pressure: wait for our oldest request before trying again.
                if pending:
                    await asyncio.wait([pending[0][1]], timeout=30)
                else:
                    await asyncio.sleep(0)
                continue
            tally.track(future)
            cancel = rng.random() < 0.1
            if cancel:
                future.cancel()
            pending.append((sample, future, cancel))
            if len(pending) >= 32:
                await asyncio.wait([f for _, f, _ in pending], timeout=30)
                for item in pending:
                    if item[1].done():
                        tally.record(*item)
                    else:
                        tally.bump("stranded")
                pending.clear()
        if pending:
            await asyncio.wait([f for _, f, _ in pending], timeout=30)
            for item in pending:
                if item[1].done():
                    tally.record(*item)
                else:
                    tally.bump("stranded")

    asyncio.run(main())


def test_chaos() -> None:
    plan = FaultPlan(seed=SEED, rate=0.08)
    # Every kind of fault, EACH_FAULT times, in a seeded order, before the random ones: the
    # run covers them all however fast or slow the machine is.
    plan.forced = [str(f) for f in np.random.default_rng(SEED).permutation(FAULTS * EACH_FAULT)]
    devices = [FaultyDevice(plan, batch_latency_us=500, **SHAPE) for _ in range(2)]
    config = RunnerConfig(
        **SHAPE,
        max_valid_num=8,
        vocab_size=1000,
        timeout_us=1_000,
        max_queue_size=64,
        device_timeout_s=0.25,
        check_finite=True,
    )
    tally = Tally()
    runner = PackRunner(devices, config).start()
    clock = Clock(plan)
    waits: list[list[Any]] = [[] for _ in range(6)]
    threads = [
        threading.Thread(target=thread_caller, args=(runner, tally, SEED + k, clock, waits[k]))
        for k in range(6)
    ] + [
        threading.Thread(target=loop_caller, args=(runner, tally, SEED + 100 + k, clock))
        for k in range(3)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for queue_ in waits:
            for sample, future, cancel in queue_:
                concurrent.futures.wait([future], timeout=30)
                if future.done():
                    tally.record(sample, future, cancel)
                else:
                    tally.bump("stranded")
        # Still serving once the faults stop.
        plan.rate = 0.0
        after = {"input_ids": [7, 8, 9]}
        assert np.array_equal(
            runner.execute(after, timeout=10)["start_logits"], reference(after)["start_logits"]
        )
        stats = runner.stats()
    finally:
        runner.close()
        plan.release.set()
        for thread in threading.enumerate():
            if thread.name.startswith("packrunner-"):
                thread.join(10)
    left = [t.name for t in threading.enumerate() if t.name.startswith("packrunner-")]
    print(  # noqa: T201 - the figures of the run, shown with -s
        f"\nchaos: {SECONDS:.0f} s seed {SEED}: {stats.requests} requests accepted, "
        f"{sum(tally.outcomes.values())} calls; outcomes {dict(tally.outcomes)}; "
        f"faults injected {dict(plan.injected)} (total {sum(plan.injected.values())}); "
        f"device timeouts {stats.device_timeouts}, replaced {stats.devices_replaced}, "
        f"nonfinite {stats.nonfinite}; wrong successes {tally.wrong_successes}; "
        f"stranded {tally.outcomes['stranded']}"
    )
    assert tally.wrong_successes == 0
    assert tally.outcomes["stranded"] == 0
    assert not tally.untyped_errors, tally.untyped_errors[:5]
    assert all(count == 1 for count in tally.resolutions.values()), "resolved more than once"
    assert all(future.done() for future in tally.futures)
    assert not left, left
    assert stats.requests == stats.completed + stats.failed + stats.withdrawn + stats.discarded
    assert tally.outcomes["success"] > 100
    assert all(plan.injected.get(fault, 0) >= EACH_FAULT for fault in FAULTS), plan.injected
    assert plan.injected.get("hang", 0) == 0 or stats.device_timeouts > 0
