"""Per-request deadlines (timeout=) on execute, execute_async and submit."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packrunner import PackRunner, RequestTimeoutError, RunnerConfig, SimulatedDevice
from tests._support import GatedDevice, assert_matches_reference

SMALL: dict[str, Any] = {"batch_size": 4, "seq_len": 16}


def gated_runner(device: GatedDevice, **kwargs: Any) -> PackRunner:
    kwargs.setdefault("timeout_us", 0)
    return PackRunner(device, RunnerConfig(**SMALL, max_inflight_batches=1, **kwargs))


def block_device(runner: PackRunner, device: GatedDevice) -> Any:
    """Occupy the only in-flight slot so that new samples wait in the queue."""
    blocker = runner.submit({"input_ids": [1]})
    device.entered.acquire()
    return blocker


@pytest.mark.parametrize("entry", ["execute", "submit", "execute_async"])
def test_a_deadline_before_packing_withdraws_the_sample(entry: str) -> None:
    device = GatedDevice(**SMALL)
    with gated_runner(device) as runner:
        blocker = block_device(runner, device)
        sample = {"input_ids": [2, 2]}
        with pytest.raises(RequestTimeoutError, match="before it was packed"):
            if entry == "execute":
                runner.execute(sample, timeout=0.05)
            elif entry == "submit":
                runner.submit(sample, timeout=0.05).result()
            else:

                async def call() -> Any:
                    return await runner.execute_async(sample, timeout=0.05)

                asyncio.run(call())
        kept = runner.submit({"input_ids": [3, 3, 3]})
        device.gate.set()
        blocker.result(10)
        assert_matches_reference({"input_ids": [3, 3, 3]}, kept.result(10))
        stats = runner.stats()
    assert stats.withdrawn == 1 and stats.discarded == 0
    assert device.batch_sizes == [1, 1], "the withdrawn sample took no slot"


def test_a_deadline_after_packing_discards_the_result_and_neighbours_complete() -> None:
    device = GatedDevice(**SMALL)
    with PackRunner(device, RunnerConfig(**SMALL, timeout_us=50_000)) as runner:
        doomed = runner.submit({"input_ids": [4, 4]}, timeout=0.1)
        patient = runner.submit({"input_ids": [5, 5]})
        device.entered.acquire()  # both are packed and on the device
        with pytest.raises(RequestTimeoutError, match="after it was packed"):
            doomed.result()
        device.gate.set()
        assert_matches_reference({"input_ids": [5, 5]}, patient.result(10))
        stats = runner.stats()
    assert stats.discarded == 1 and stats.completed == 1 and stats.withdrawn == 0
    assert device.batch_sizes == [2]


def test_a_zero_or_negative_timeout_expires_at_once() -> None:
    with PackRunner(SimulatedDevice(batch_latency_us=0, **SMALL), RunnerConfig(**SMALL)) as r:
        for timeout in (0, -1.0):
            with pytest.raises(RequestTimeoutError):
                r.execute({"input_ids": [1]}, timeout=timeout)
        with pytest.raises(TypeError):
            r.submit({"input_ids": [1]}, timeout="soon")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            r.submit({"input_ids": [1]}, timeout=float("nan"))


def test_a_deadline_does_not_wait_for_the_batch_timeout() -> None:
    """The engine wakes for a deadline earlier than its own batching deadline."""
    config = RunnerConfig(**SMALL, timeout_us=60_000_000)  # a lone sample would wait 60 s
    with PackRunner(SimulatedDevice(batch_latency_us=0, **SMALL), config) as runner:
        with pytest.raises(RequestTimeoutError, match="before it was packed"):
            runner.submit({"input_ids": [1, 2]}, timeout=0.05).result(30)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    timeouts=st.lists(st.none() | st.floats(0.0, 0.03), min_size=1, max_size=40),
    latency_us=st.sampled_from([0, 2_000, 10_000]),
    seed=st.integers(0, 2**16),
)
def test_every_request_resolves_once_with_its_result_or_a_timeout(
    timeouts: list[float | None], latency_us: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    samples = [{"input_ids": rng.integers(0, 1000, rng.integers(1, 17))} for _ in timeouts]
    config = RunnerConfig(**SMALL, timeout_us=int(rng.integers(0, 5_000)))
    device = SimulatedDevice(batch_latency_us=latency_us, **SMALL)
    resolutions: list[int] = [0] * len(samples)
    lock = threading.Lock()
    with PackRunner(device, config) as runner:
        futures = []
        for k, (sample, timeout) in enumerate(zip(samples, timeouts, strict=True)):
            future = runner.submit(sample, timeout=timeout)

            def count(_: Any, k: int = k) -> None:
                with lock:
                    resolutions[k] += 1

            future.add_done_callback(count)
            futures.append(future)
        for sample, timeout, future in zip(samples, timeouts, futures, strict=True):
            error = future.exception(30)
            if error is None:
                assert_matches_reference(sample, future.result())
            else:
                assert isinstance(error, RequestTimeoutError) and timeout is not None
        stats = runner.stats()
    assert resolutions == [1] * len(samples)
    assert stats.completed + stats.withdrawn + stats.discarded == len(samples)
    assert stats.failed == 0


def test_a_cancelled_submit_future_is_seen_done_by_wait() -> None:
    """concurrent.futures.wait / as_completed see a cancelled future at once."""
    import concurrent.futures

    device = GatedDevice(**SMALL)
    with gated_runner(device) as runner:
        blocker = block_device(runner, device)
        future = runner.submit({"input_ids": [2]})
        assert future.cancel()
        done, _ = concurrent.futures.wait([future], timeout=30)
        assert future in done
        device.gate.set()
        blocker.result(10)
