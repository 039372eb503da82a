"""PackRunner through blocking execute: threads, timeouts, devices, config checks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from packrunner import (
    ConfigError,
    DeviceError,
    InputForm,
    PackAlgorithm,
    PackRunner,
    RequestTimeoutError,
    RunnerClosedError,
    RunnerConfig,
    SimulatedDevice,
)
from tests._support import GatedDevice, assert_matches_reference, random_samples


def test_many_threads_calling_execute_at_once():
    samples = random_samples(1200, seed=21)
    config = RunnerConfig(timeout_us=2_000)
    with PackRunner(SimulatedDevice(batch_latency_us=1_000), config) as runner:
        with ThreadPoolExecutor(max_workers=56) as pool:  # PopRT's 3.5 x batch_size clients
            results = list(pool.map(runner.execute, samples))
        stats = runner.stats()
    for sample, result in zip(samples, results, strict=True):
        assert_matches_reference(sample, result)
    assert stats.completed == len(samples)
    assert stats.mean_samples_per_batch > 16, "concurrent callers get packed together"


def test_execute_timeout_withdraws_the_sample():
    device = GatedDevice()
    config = RunnerConfig(timeout_us=0, max_inflight_batches=1)
    with PackRunner(device, config) as runner:
        blocker = threading.Thread(target=runner.execute, args=({"input_ids": [1]},))
        blocker.start()
        device.entered.acquire()
        with pytest.raises(RequestTimeoutError, match="before it was packed"):
            runner.execute({"input_ids": [2]}, timeout=0.05)
        assert runner.stats().withdrawn == 1
        device.gate.set()
        blocker.join()
        assert_matches_reference({"input_ids": [3]}, runner.execute({"input_ids": [3]}))


def test_several_devices_share_the_queue():
    devices = [SimulatedDevice(batch_latency_us=2_000) for _ in range(3)]
    samples = random_samples(600, seed=8)
    with PackRunner(devices, RunnerConfig(timeout_us=1_000)) as runner:
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(runner.execute, samples))
    for sample, result in zip(samples, results, strict=True):
        assert_matches_reference(sample, result)
    assert all(d.batches_run > 0 for d in devices), [d.batches_run for d in devices]


def test_device_that_fails_to_open_fails_start_and_leaves_nothing_running():
    class Broken(SimulatedDevice):
        def open(self) -> None:
            raise OSError("no accelerator attached")

    runner = PackRunner([SimulatedDevice(), Broken()])
    with pytest.raises(DeviceError, match="failed to open") as info:
        runner.start()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RunnerClosedError):
        runner.execute({"input_ids": [1]})


def test_close_from_another_thread_while_callers_wait():
    device = GatedDevice()
    runner = PackRunner(device, RunnerConfig(timeout_us=0, max_inflight_batches=1)).start()
    outcomes: list[object] = []

    def call(i: int) -> None:
        try:
            outcomes.append(runner.execute({"input_ids": [i + 1]}))
        except RunnerClosedError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    device.entered.acquire()
    closer = threading.Thread(target=runner.close, kwargs={"drain": False})
    closer.start()
    device.gate.set()
    closer.join()
    for t in threads:
        t.join()
    assert len(outcomes) == 20
    assert any(isinstance(o, dict) for o in outcomes)


def test_device_shape_mismatch_is_refused_at_construction():
    with pytest.raises(ConfigError, match="seq_len=128"):
        PackRunner(SimulatedDevice(seq_len=256), RunnerConfig(seq_len=128))
    with pytest.raises(ConfigError, match="algorithm=stream"):
        PackRunner(SimulatedDevice(), RunnerConfig(algorithm=PackAlgorithm.STREAM))
    with pytest.raises(ConfigError, match="use algorithm=stream"):
        PackRunner(SimulatedDevice(form=InputForm.UNPACK_REPACK), RunnerConfig())
    with pytest.raises(ConfigError, match="dynamic_input_name='tokens'"):
        PackRunner(SimulatedDevice(), RunnerConfig(dynamic_input_name="tokens"))


def test_simulated_device_accepts_only_its_compiled_shapes():
    device = SimulatedDevice(batch_latency_us=0)
    feeds = {name: np.zeros((16, 256), np.int32) for name in device.input_specs}
    device.run(feeds)
    with pytest.raises(ValueError, match="compiled shape"):
        device.run(dict(feeds, input_ids=np.zeros((16, 255), np.int32)))
    with pytest.raises(ValueError, match="compiled dtype"):
        device.run(dict(feeds, input_ids=np.zeros((16, 256), np.int64)))
    with pytest.raises(ValueError, match="expects inputs"):
        device.run({"input_ids": feeds["input_ids"]})


def test_simulated_device_takes_its_latency_without_burning_cpu():
    import time

    device = SimulatedDevice(batch_latency_us=50_000)
    feeds = {name: np.zeros((16, 256), np.int32) for name in device.input_specs}
    wall, cpu = time.perf_counter(), time.process_time()
    device.run(feeds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.05
    assert cpu < wall / 2


def test_submit_returns_a_concurrent_future_and_cancel_withdraws():
    device = GatedDevice()
    config = RunnerConfig(timeout_us=0, max_inflight_batches=1)
    with PackRunner(device, config) as runner:
        first = runner.submit({"input_ids": [1]})
        device.entered.acquire()
        doomed = runner.submit({"input_ids": [2, 2]})
        kept = runner.submit({"input_ids": [3, 3, 3]})
        assert doomed.cancel()
        device.gate.set()
        assert_matches_reference({"input_ids": [1]}, first.result(10))
        assert_matches_reference({"input_ids": [3, 3, 3]}, kept.result(10))
        stats = runner.stats()
    assert stats.withdrawn == 1 and stats.samples == 2
    assert device.batch_sizes == [1, 1]


def test_callbacks_on_the_engine_thread_cannot_deadlock_it():
    outcomes: list[object] = []
    runner = PackRunner(SimulatedDevice(batch_latency_us=0), RunnerConfig(timeout_us=0)).start()

    def on_done(future):
        try:
            runner.execute({"input_ids": [5]})  # would wait for the thread running it
        except RuntimeError as exc:
            outcomes.append(exc)
        runner.close()  # allowed: begins the shutdown, the engine completes it
        outcomes.append(future.result())

    runner.submit({"input_ids": [4]}).add_done_callback(on_done)
    runner.close()  # joins; returns once the engine has wound down
    assert isinstance(outcomes[0], RuntimeError) and "engine thread" in str(outcomes[0])
    assert isinstance(outcomes[1], dict)
    with pytest.raises(RunnerClosedError):
        runner.submit({"input_ids": [6]})
