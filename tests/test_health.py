"""Health states over a runner's life, and warm-up."""

from __future__ import annotations

import pytest

from packrunner import (
    DeviceError,
    Health,
    HealthState,
    InputForm,
    PackAlgorithm,
    PackRunner,
    RunnerClosedError,
    RunnerConfig,
    SimulatedDevice,
)
from packrunner.prometheus import RunnerCollector
from tests._support import FaultPlan, FaultyDevice


def device_for(
    algorithm: PackAlgorithm, *, batch_size: int, seq_len: int, max_valid_num: int = 40
) -> SimulatedDevice:
    return SimulatedDevice(
        form=InputForm.for_algorithm(algorithm),
        batch_latency_us=0,
        batch_size=batch_size,
        seq_len=seq_len,
        max_valid_num=max_valid_num,
    )


def test_health_follows_the_lifecycle() -> None:
    plan = FaultPlan(seed=0, rate=0.0)
    runner = PackRunner(
        FaultyDevice(plan, batch_size=4, seq_len=16),
        RunnerConfig(batch_size=4, seq_len=16, max_valid_num=8),
    )
    assert runner.health() == Health(HealthState.STARTING, True, False, "not started")
    with runner:
        health = runner.health()
        assert health.state is HealthState.WARMING and health.live and not health.ready
        runner.warmup(timeout=10)
        assert runner.health() == Health(HealthState.READY, True, True, None)
        plan.forced.append("raise")
        with pytest.raises(DeviceError):
            runner.execute({"input_ids": [1]}, timeout=10)
        health = runner.health()
        assert health.state is HealthState.DEGRADED and health.live and not health.ready
        assert health.reason is not None and "injected device fault" in health.reason
        gauges = {m.name: m.samples[0].value for m in RunnerCollector(runner).collect()}
        assert gauges["packrunner_ready"] == 0 and gauges["packrunner_live"] == 1
        runner.execute({"input_ids": [1]}, timeout=10)
        assert runner.health().ready
    assert runner.health() == Health(HealthState.CLOSED, False, False, "closed")
    with pytest.raises(RunnerClosedError):
        runner.warmup()


def test_health_is_closing_once_close_has_begun() -> None:
    runner = PackRunner(SimulatedDevice(batch_latency_us=0), RunnerConfig(timeout_us=0)).start()
    observed: list[Health] = []

    def on_done(_: object) -> None:
        runner.close()  # from the engine thread: begins the shutdown and returns
        observed.append(runner.health())

    runner.submit({"input_ids": [1]}).add_done_callback(on_done)
    runner.close()
    assert observed == [Health(HealthState.CLOSING, True, False, "closing")]
    assert runner.health().state is HealthState.CLOSED


@pytest.mark.parametrize("algorithm", list(PackAlgorithm))
def test_warmup_runs_exactly_one_full_batch(algorithm: PackAlgorithm) -> None:
    config = RunnerConfig(batch_size=4, seq_len=16, max_valid_num=3, algorithm=algorithm)
    device = device_for(algorithm, batch_size=4, seq_len=16, max_valid_num=3)
    with PackRunner(device, config) as runner:
        runner.warmup(timeout=10)
        stats = runner.stats()
    assert stats.batches == stats.batches_full == 1 == device.batches_run
    assert stats.samples == stats.completed == min(4, config.samples_cap)
    assert stats.tokens == stats.samples * 16


async def test_warmup_async() -> None:
    config = RunnerConfig(batch_size=4, seq_len=16, max_valid_num=8)
    async with PackRunner(
        device_for(PackAlgorithm.LOOKAHEAD, batch_size=4, seq_len=16), config
    ) as r:
        assert not r.health().ready
        await r.warmup_async(timeout=10)
        assert r.health().ready
