"""Device faults and hostile callbacks: every future resolves once, the runner keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from packrunner import (
    DeviceError,
    DeviceTimeoutError,
    HealthState,
    InputForm,
    PackAlgorithm,
    PackRunner,
    RunnerConfig,
    SimulatedDevice,
)
from packrunner.prometheus import RunnerCollector
from tests._support import FaultPlan, FaultyDevice, assert_matches_reference, random_samples

SMALL: dict[str, Any] = {"batch_size": 4, "seq_len": 16}
SAMPLE = {"input_ids": np.array([3, 4, 5], np.int32)}


def config(**kwargs: Any) -> RunnerConfig:
    kwargs.setdefault("timeout_us", 500)
    kwargs.setdefault("max_valid_num", 8)
    return RunnerConfig(**SMALL, **kwargs)


@pytest.fixture
def plan() -> Iterator[FaultPlan]:
    fault_plan = FaultPlan(seed=0, rate=0.0)
    yield fault_plan
    # Hung runs end when released; their (abandoned) threads then finish.
    fault_plan.release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("packrunner-"):
            thread.join(10)


@pytest.mark.parametrize("fault", ["raise", "cancelled", "interrupt", "exit"])
def test_a_device_raising_anything_fails_only_its_batch(plan: FaultPlan, fault: str) -> None:
    plan.forced.append(fault)
    with PackRunner(FaultyDevice(plan, **SMALL), config()) as runner:
        first = runner.submit(SAMPLE)
        with pytest.raises(DeviceError) as info:
            first.result(10)
        assert info.value.__cause__ is not None
        assert type(info.value.__cause__).__name__ in (
            "RuntimeError",
            "CancelledError",
            "KeyboardInterrupt",
            "SystemExit",
        )
        # The worker survived: the next batch runs on the same device.
        assert_matches_reference(SAMPLE, runner.execute(SAMPLE, timeout=10))
        stats = runner.stats()
    assert stats.batches_failed == 1 and stats.completed == 1 and stats.failed == 1


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, RuntimeError])
def test_a_done_callback_raising_strands_nobody(raised: type[BaseException]) -> None:
    device = SimulatedDevice(batch_latency_us=0, **SMALL)
    with PackRunner(device, config(timeout_us=50_000)) as runner:
        futures = [runner.submit({"input_ids": [i + 1, 2]}) for i in range(6)]

        def explode(_: concurrent.futures.Future[Any]) -> None:
            raise raised("from a callback")

        for future in futures[:3]:
            future.add_done_callback(explode)
        for i, future in enumerate(futures):
            assert_matches_reference({"input_ids": [i + 1, 2]}, future.result(10))
        # The engine thread survived.
        assert_matches_reference(SAMPLE, runner.execute(SAMPLE, timeout=10))


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("transposed", r"'start_logits' has shape \(16, 4\), expected \(4, 16\)"),
        ("missing", "no output 'end_logits'"),
        ("extra_dim", r"'end_logits' has shape \(4, 16, 1\), expected \(4, 16\)"),
    ],
)
def test_outputs_that_do_not_match_the_specs_fail_the_batch(
    plan: FaultPlan, fault: str, match: str
) -> None:
    plan.forced.append(fault)
    with PackRunner(FaultyDevice(plan, **SMALL), config()) as runner:
        with pytest.raises(DeviceError, match=match):
            runner.execute(SAMPLE, timeout=10)
        assert runner.health().state is HealthState.DEGRADED
        assert_matches_reference(SAMPLE, runner.execute(SAMPLE, timeout=10))
        assert runner.health().state is HealthState.WARMING  # a batch succeeded again


def test_outputs_of_the_wrong_kind_fail_the_batch() -> None:
    class Garbage(SimulatedDevice):
        def __init__(self, value: object) -> None:
            super().__init__(batch_latency_us=0, **SMALL)
            self.value = value

        def run(self, feeds: Any) -> Any:
            outputs: dict[str, object] = dict(super().run(feeds))
            outputs["start_logits"] = self.value
            return outputs

    for value, match in [
        (np.zeros((4, 16), dtype=object), "dtype object"),
        ([[0.0] * 16] * 4, "not a numpy array"),
    ]:
        with PackRunner(Garbage(value), config()) as runner:
            with pytest.raises(DeviceError, match=match):
                runner.execute(SAMPLE, timeout=10)


def test_check_finite_fails_only_the_samples_with_nan(plan: FaultPlan) -> None:
    plan.forced.append("nan")  # NaN in the first token of the batch's first sample
    samples = [{"input_ids": [i + 1, 5, 6]} for i in range(4)]
    with PackRunner(FaultyDevice(plan, **SMALL), config(timeout_us=50_000, check_finite=True)) as r:
        futures = [r.submit(s) for s in samples]
        outcomes = [f.exception(10) or f.result() for f in futures]
        stats = r.stats()
        metrics = {m.name: m for m in RunnerCollector(r).collect()}
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], DeviceError)
    assert "NaN or Inf" in str(failed[0])
    for sample, outcome in zip(samples, outcomes, strict=True):
        if not isinstance(outcome, BaseException):
            assert_matches_reference(sample, outcome)
    assert stats.nonfinite == 1 and stats.failed == 1 and stats.completed == 3
    assert metrics["packrunner_nonfinite_samples"].samples[0].value == 1


def test_without_check_finite_nan_is_delivered_as_computed(plan: FaultPlan) -> None:
    """The negative control: the finite check is what turns NaN into an error."""
    plan.forced.append("nan")
    with PackRunner(FaultyDevice(plan, **SMALL), config()) as runner:
        result = runner.execute(SAMPLE, timeout=10)
    assert np.isnan(result["start_logits"]).any()


def test_each_failed_future_gets_its_own_exception(plan: FaultPlan) -> None:
    plan.forced.append("raise")
    with PackRunner(FaultyDevice(plan, **SMALL), config(timeout_us=50_000)) as runner:
        futures = [runner.submit({"input_ids": [i + 1]}) for i in range(4)]
        errors = [f.exception(10) for f in futures]
    assert all(isinstance(e, DeviceError) for e in errors)
    assert len({id(e) for e in errors}) == 4, "one instance per future"
    causes = {id(e.__cause__) for e in errors if e is not None}
    assert len(causes) == 1, "all chained to the one root cause"


def test_a_warmup_that_hangs_fails_and_a_second_one_on_the_replica_succeeds(
    plan: FaultPlan,
) -> None:
    plan.forced.append("hang")
    with PackRunner(FaultyDevice(plan, **SMALL), config(device_timeout_s=0.3)) as runner:
        with pytest.raises(DeviceTimeoutError):
            runner.warmup(timeout=10)
        assert not runner.health().ready
        runner.warmup(timeout=10)
        assert runner.health().ready


def test_a_hung_device_times_out_is_replaced_and_serving_recovers(plan: FaultPlan) -> None:
    with PackRunner(FaultyDevice(plan, **SMALL), config(device_timeout_s=0.3)) as runner:
        runner.warmup(timeout=10)
        assert runner.health().ready
        plan.forced.append("hang")
        with pytest.raises(DeviceTimeoutError, match="device_timeout_s=0.3"):
            runner.execute(SAMPLE)
        health = runner.health()
        assert health.state is HealthState.DEGRADED and health.live and not health.ready
        assert "the last batch failed" in (health.reason or "")
        # A fresh replica serves the next batch; success clears the degraded state.
        assert_matches_reference(SAMPLE, runner.execute(SAMPLE, timeout=10))
        assert runner.health().ready
        stats = runner.stats()
    assert stats.device_timeouts == 1 and stats.devices_replaced == 1


def test_a_hung_device_that_cannot_be_replaced_leaves_the_others_serving(plan: FaultPlan) -> None:
    hung_plan = FaultPlan(seed=1, rate=0.0)
    hung_plan.forced.append("hang")

    class AfterTheHang(FaultyDevice):
        """Runs nothing until the other device hangs, so that one surely gets a batch."""

        def run(self, feeds: Any) -> Any:
            hung_plan.hung.wait(10)
            return super().run(feeds)

    devices = [
        FaultyDevice(hung_plan, replaceable=False, **SMALL),
        AfterTheHang(plan, replaceable=False, **SMALL),
    ]
    try:
        with PackRunner(devices, config(device_timeout_s=0.3, timeout_us=0)) as runner:
            outcomes = [runner.submit({"input_ids": [i + 1]}) for i in range(20)]
            results = [f.exception(10) or f.result() for f in outcomes]
            assert sum(isinstance(r, DeviceTimeoutError) for r in results) >= 1
            assert all(isinstance(r, dict | DeviceTimeoutError) for r in results)
            assert runner.health().live
            assert_matches_reference(SAMPLE, runner.execute(SAMPLE, timeout=10))
    finally:
        hung_plan.release.set()


def test_no_device_left_fails_fast_and_close_is_bounded(plan: FaultPlan) -> None:
    plan.forced.append("hang")
    runner = PackRunner(
        FaultyDevice(plan, replaceable=False, **SMALL), config(device_timeout_s=0.3)
    )
    with runner:
        hung = set(threading.enumerate())
        with pytest.raises(DeviceTimeoutError):
            runner.execute(SAMPLE)
        # The replacement attempt runs on its own thread; once it has ended, its verdict is
        # on the engine loop ahead of any later request.
        for thread in set(threading.enumerate()) - hung:
            if thread.name.startswith("packrunner-device-"):
                thread.join(10)
        with pytest.raises(DeviceError, match="no working device left"):
            runner.execute(SAMPLE)
        health = runner.health()
        assert health.state is HealthState.DEGRADED and not health.live
        assert "no working device left" in (health.reason or "")
        with pytest.raises(DeviceError, match="no working device left"):
            runner.submit(SAMPLE)
    assert runner.health().state is HealthState.CLOSED


def test_close_without_drain_is_bounded_by_the_device_timeout(plan: FaultPlan) -> None:
    plan.forced.append("hang")
    runner = PackRunner(FaultyDevice(plan, **SMALL), config(device_timeout_s=0.3)).start()
    stuck = runner.submit(SAMPLE)
    assert plan.hanging.acquire(timeout=10)  # the sample is on the hung device
    closer = threading.Thread(target=runner.close, kwargs={"drain": False})
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() waited for the hung device"
    assert isinstance(stuck.exception(0), DeviceTimeoutError)


async def test_async_callers_get_device_errors_of_every_kind(plan: FaultPlan) -> None:
    plan.forced.extend(["exit", "transposed"])
    async with PackRunner(FaultyDevice(plan, **SMALL), config()) as runner:
        for _ in range(2):
            with pytest.raises(DeviceError):
                await runner.execute_async(SAMPLE)
        samples = random_samples(50, seed=3)
        for sample in samples:
            sample["input_ids"] = sample["input_ids"][:16]
            sample["token_type_ids"] = sample["token_type_ids"][:16]
        results = await asyncio.gather(*(runner.execute_async(s) for s in samples))
    for sample, result in zip(samples, results, strict=True):
        assert_matches_reference(sample, result)


def test_stream_mode_outputs_are_checked_too() -> None:
    class Transposing(SimulatedDevice):
        def run(self, feeds: Any) -> Any:
            outputs = super().run(feeds)
            outputs["start_logits"] = outputs["start_logits"][:, :8]
            return outputs

    device = Transposing(form=InputForm.UNPACK_REPACK, batch_latency_us=0, max_valid_num=8, **SMALL)
    with PackRunner(device, config(algorithm=PackAlgorithm.STREAM)) as runner:
        with pytest.raises(DeviceError, match=r"shape \(8, 8\), expected \(8, 16\)"):
            runner.execute(SAMPLE, timeout=10)
