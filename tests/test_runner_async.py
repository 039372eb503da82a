"""PackRunner through execute_async: equivalence, batching behaviour, errors, lifecycle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from packrunner import (
    DeviceError,
    InputForm,
    InvalidSampleError,
    OverloadedError,
    PackAlgorithm,
    PackRunner,
    RunnerClosedError,
    RunnerConfig,
    RunnerNotStartedError,
    SimulatedDevice,
)
from tests._support import (
    GatedDevice,
    PoisonDevice,
    assert_matches_reference,
    make_sample,
    random_samples,
)


def device_for(algorithm: PackAlgorithm, **kwargs) -> SimulatedDevice:
    # Every row algorithm, padded included, on the packed device (a padded batch is a packed
    # batch with one segment per row, and callers may pass position_ids); stream on its own form.
    form = InputForm.UNPACK_REPACK if algorithm is PackAlgorithm.STREAM else InputForm.PACKED
    return SimulatedDevice(form=form, **kwargs)


@pytest.mark.parametrize("algorithm", list(PackAlgorithm))
async def test_every_algorithm_returns_each_callers_own_outputs(algorithm):
    samples = random_samples(2500, seed=11)
    # A few callers pass explicit position ids and attention masks of ones.
    samples[3]["position_ids"] = np.arange(len(samples[3]["input_ids"]), dtype=np.int32)
    samples[4]["attention_mask"] = np.ones(len(samples[4]["input_ids"]), dtype=np.int64)
    config = RunnerConfig(algorithm=algorithm, timeout_us=2_000, vocab_size=30522)
    async with PackRunner(device_for(algorithm, batch_latency_us=0), config) as runner:
        results = await asyncio.gather(*(runner.execute_async(s) for s in samples))
        stats = runner.stats()
    for sample, result in zip(samples, results, strict=True):
        assert_matches_reference(sample, result)
    assert stats.completed == stats.samples == len(samples)
    assert stats.failed == 0 and stats.queue_depth == 0 and stats.inflight_batches == 0
    if algorithm is PackAlgorithm.PADDED:
        assert stats.mean_samples_per_batch <= 16
    else:
        assert stats.mean_samples_per_batch > 20


async def test_lone_sample_returns_after_about_the_timeout():
    config = RunnerConfig(timeout_us=200_000)
    async with PackRunner(SimulatedDevice(batch_latency_us=0), config) as runner:
        started = time.monotonic()
        await runner.execute_async({"input_ids": [5, 6, 7]})
        elapsed = time.monotonic() - started
        stats = runner.stats()
    assert 0.2 <= elapsed < 1.5
    assert stats.batches_timeout == 1


async def test_full_batch_dispatches_without_waiting_for_the_timeout():
    config = RunnerConfig(timeout_us=30_000_000)  # 30 s: only fullness can dispatch in time
    rng = np.random.default_rng(0)
    async with PackRunner(SimulatedDevice(batch_latency_us=0), config) as runner:
        # 16 samples of 256 tokens fill all 16 rows exactly.
        samples = [make_sample(rng, 256) for _ in range(16)]
        results = await asyncio.wait_for(
            asyncio.gather(*(runner.execute_async(s) for s in samples)), timeout=10
        )
        stats = runner.stats()
    assert stats.batches == stats.batches_full == 1
    for sample, result in zip(samples, results, strict=True):
        assert_matches_reference(sample, result)


async def test_max_valid_num_makes_a_batch_full():
    config = RunnerConfig(timeout_us=30_000_000, max_valid_num=5)
    async with PackRunner(SimulatedDevice(batch_latency_us=0), config) as runner:
        await asyncio.wait_for(
            asyncio.gather(*(runner.execute_async({"input_ids": [1, 2]}) for _ in range(5))), 10
        )
        assert runner.stats().batches_full == 1


async def test_device_keeps_accumulating_while_busy():
    """While the device is busy the queue grows and the next batch is packed from all of it."""
    device = GatedDevice()
    config = RunnerConfig(timeout_us=0, max_inflight_batches=1)
    async with PackRunner(device, config) as runner:
        first = runner.execute_async({"input_ids": [1]})
        await asyncio.to_thread(device.entered.acquire)  # the lone sample is on the device
        rest = [runner.execute_async({"input_ids": [2, 3]}) for _ in range(30)]
        assert runner.stats().queue_depth == 30
        device.gate.set()
        await asyncio.gather(first, *rest)
        assert device.batch_sizes == [1, 30]


async def test_invalid_samples_are_rejected_at_submit_and_never_queued():
    config = RunnerConfig(vocab_size=100, seq_len=8, batch_size=2)
    async with PackRunner(
        SimulatedDevice(batch_size=2, seq_len=8, batch_latency_us=0), config
    ) as runner:
        bad: list[tuple[Any, str]] = [
            ("not a mapping", "mapping"),
            ({}, "missing required input 'input_ids'"),
            ({"input_ids": [1], "bogus": [1]}, "unknown input"),
            ({"input_ids": [1.5, 2.0]}, "integer dtype"),
            ({"input_ids": np.array([True])}, "integer dtype"),
            ({"input_ids": [[1, 2]]}, "1-D"),
            ({"input_ids": []}, "empty"),
            ({"input_ids": list(range(9))}, "more than seq_len"),
            ({"input_ids": [1, 2], "token_type_ids": [0]}, "length 1"),
            ({"input_ids": [1, -2]}, "negative"),
            ({"input_ids": [1, 100]}, "must be < 100"),
            ({"input_ids": [1, 2], "token_type_ids": [0, 2]}, "must be < 2"),
            ({"input_ids": [1, 2], "attention_mask": [1, 0]}, "all ones"),
            ({"input_ids": "abc"}, "numpy array or a list"),
            ({"input_ids": [1, "x"]}, "integer dtype"),
            ({"input_ids": [1, 2], "position_ids": [0, 8]}, "must be < 8"),
        ]
        for sample, message in bad:
            with pytest.raises(InvalidSampleError, match=message):
                await runner.execute_async(sample)
        good = await runner.execute_async({"input_ids": [1, 2]})
        stats = runner.stats()
    assert good["start_logits"].shape == (2,)
    assert stats.rejected_invalid == len(bad) and stats.requests == 1


async def test_device_failure_fails_only_that_batch_and_the_runner_keeps_serving():
    config = RunnerConfig(algorithm=PackAlgorithm.PADDED, timeout_us=1_000)
    rng = np.random.default_rng(2)
    async with PackRunner(PoisonDevice(), config) as runner:
        clean = [{"input_ids": rng.integers(8, 30522, 20, dtype=np.int32)} for _ in range(48)]
        poisoned = {"input_ids": np.array([PoisonDevice.POISON, 9], dtype=np.int32)}
        tasks = [runner.execute_async(s) for s in clean[:16]]
        bad = runner.execute_async(poisoned)
        tasks += [runner.execute_async(s) for s in clean[16:]]
        outcomes = await asyncio.gather(*tasks, bad, return_exceptions=True)
        after = await runner.execute_async(clean[0])
        stats = runner.stats()
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(outcomes[-1], DeviceError)
    assert isinstance(outcomes[-1].__cause__, RuntimeError)
    assert len(errors) == 16, "exactly the poisoned sample's batch (16 padded rows) fails"
    assert stats.batches_failed == 1 and stats.failed == 16
    assert_matches_reference(clean[0], after)


async def test_cancelled_caller_takes_no_slot():
    device = GatedDevice()
    config = RunnerConfig(timeout_us=0, max_inflight_batches=1)
    async with PackRunner(device, config) as runner:
        first = runner.execute_async({"input_ids": [1]})
        await asyncio.to_thread(device.entered.acquire)
        keep = [runner.execute_async({"input_ids": [2, 2]}) for _ in range(3)]
        doomed = runner.execute_async({"input_ids": [3, 3, 3]})

        submitted = asyncio.Event()

        async def waits_for_it():
            future = runner.execute_async({"input_ids": [4, 4, 4, 4]})  # queued on return
            submitted.set()
            return await future

        doomed_task = asyncio.ensure_future(waits_for_it())
        await submitted.wait()
        doomed.cancel()  # the future itself
        doomed_task.cancel()  # a task awaiting its future
        for cancelled in (doomed, doomed_task):
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        device.gate.set()
        await asyncio.gather(first, *keep)
        stats = runner.stats()
    assert device.batch_sizes == [1, 3]
    assert stats.withdrawn == 2 and stats.samples == 4 and stats.requests == 6


async def test_overload_is_immediate_and_bounded():
    device = GatedDevice()
    config = RunnerConfig(timeout_us=0, max_inflight_batches=1, max_queue_size=4)
    async with PackRunner(device, config) as runner:
        first = runner.execute_async({"input_ids": [1]})
        await asyncio.to_thread(device.entered.acquire)
        queued = [runner.execute_async({"input_ids": [2]}) for _ in range(4)]  # queued on return
        with pytest.raises(OverloadedError, match="max_queue_size=4"):
            await runner.execute_async({"input_ids": [3]})
        device.gate.set()
        await asyncio.gather(first, *queued)
        assert runner.stats().rejected_overloaded == 1


async def test_close_drains_accepted_work(stepped_device):
    device = stepped_device
    runner = PackRunner(device, RunnerConfig(timeout_us=10_000_000, max_inflight_batches=1))
    await runner.__aenter__()
    tasks = [runner.execute_async({"input_ids": [i + 1]}) for i in range(50)]
    await asyncio.to_thread(device.entered.acquire)  # a full batch of 40 is on the device
    closing = asyncio.create_task(runner.aclose())
    # The other 10 would wait 10 s for their timeout; a draining runner sends them as soon as the
    # device is free, so their batch entering the device shows that the close has begun.
    device.allow.release()
    await asyncio.to_thread(device.entered.acquire)
    with pytest.raises(RunnerClosedError):
        await runner.execute_async({"input_ids": [1]})
    device.allow.release()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    await closing
    assert len(results) == 50 and runner.stats().completed == 50
    assert device.batch_sizes == [40, 10]


async def test_close_without_drain_fails_waiting_work():
    device = GatedDevice()
    runner = PackRunner(device, RunnerConfig(timeout_us=0, max_inflight_batches=1))
    await runner.__aenter__()
    on_device = runner.execute_async({"input_ids": [1]})
    await asyncio.to_thread(device.entered.acquire)
    waiting = [runner.execute_async({"input_ids": [2]}) for _ in range(10)]  # queued on return
    closing = asyncio.create_task(runner.aclose(drain=False))
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)
    assert all(isinstance(o, RunnerClosedError) for o in outcomes)
    device.gate.set()
    await closing
    assert_matches_reference({"input_ids": [1]}, await on_device)


async def test_lifecycle_errors():
    runner = PackRunner(SimulatedDevice(batch_latency_us=0))
    with pytest.raises(RunnerNotStartedError):
        await runner.execute_async({"input_ids": [1]})
    async with runner:
        await runner.execute_async({"input_ids": [1]})
    with pytest.raises(RunnerClosedError):
        await runner.execute_async({"input_ids": [1]})
    await runner.aclose()  # idempotent
    with pytest.raises(RunnerClosedError):
        runner.start()


async def test_callers_on_several_event_loops():
    samples = random_samples(200, seed=4)

    def on_own_loop(chunk):
        async def go():
            return await asyncio.gather(*(runner.execute_async(s) for s in chunk))

        return asyncio.run(go())

    async with PackRunner(
        SimulatedDevice(batch_latency_us=0), RunnerConfig(timeout_us=1000)
    ) as runner:
        halves = await asyncio.gather(
            asyncio.to_thread(on_own_loop, samples[:100]),
            asyncio.to_thread(on_own_loop, samples[100:]),
        )
    for sample, result in zip(samples, halves[0] + halves[1], strict=True):
        assert_matches_reference(sample, result)
