"""Prometheus export of runner statistics, through a real registry and text exposition."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from packrunner import InvalidSampleError, PackRunner, RunnerConfig, SimulatedDevice
from packrunner.prometheus import RunnerCollector
from tests._support import random_samples


async def test_collector_reports_the_runners_counters_and_latency():
    samples = random_samples(100, seed=3)
    config = RunnerConfig(timeout_us=1_000)
    async with PackRunner(SimulatedDevice(batch_latency_us=2_000), config) as runner:
        await asyncio.gather(*(runner.execute_async(s) for s in samples))
        try:
            runner.execute_async({"input_ids": []})
        except InvalidSampleError:
            pass
        registry = CollectorRegistry()
        registry.register(RunnerCollector(runner, model="sim"))
        text = generate_latest(registry).decode()
        stats = runner.stats()
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    model = (("model", "sim"),)
    assert values[("packrunner_requests_total", model)] == 100
    assert values[("packrunner_completed_total", model)] == 100
    assert values[("packrunner_rejected_total", (("model", "sim"), ("reason", "invalid")))] == 1
    assert values[("packrunner_samples_total", model)] == 100
    assert values[("packrunner_queue_depth", model)] == 0
    assert values[("packrunner_samples_per_batch", model)] == stats.mean_samples_per_batch
    assert values[("packrunner_request_latency_seconds_count", model)] == 100
    inf = values[("packrunner_request_latency_seconds_bucket", (("le", "+Inf"), ("model", "sim")))]
    assert inf == 100
    tiny = values[
        ("packrunner_request_latency_seconds_bucket", (("le", "0.001"), ("model", "sim")))
    ]
    assert tiny == 0  # every sample waits at least one 2 ms device batch
    mean = values[("packrunner_request_latency_seconds_sum", model)] / 100
    assert 0.002 <= mean < 1.0
    assert stats.queue_wait_sum_s <= stats.latency_sum_s
