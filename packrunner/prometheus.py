"""Prometheus metrics for a running :class:`~packrunner.PackRunner` (prometheus-client).

A custom collector reads one :meth:`PackRunner.stats` snapshot per scrape, so the request path
pays nothing for metrics::

    from prometheus_client import REGISTRY, start_http_server
    from packrunner.prometheus import RunnerCollector

    REGISTRY.register(RunnerCollector(runner, model="bert-qa"))
    start_http_server(9000)

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` units) with the
``packrunner_`` prefix; ``constant_labels`` (e.g. ``model``) are added to every series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from packrunner.runner import PackRunner

__all__ = ["RunnerCollector"]


class RunnerCollector(Collector):
    """Exposes a runner's counters, gauges and request-latency histogram.

    Args:
        runner: The runner to report on.
        prefix: Metric name prefix.
        **constant_labels: Labels added to every series (e.g. ``model="bert-qa"``).
    """

    def __init__(self, runner: PackRunner, *, prefix: str = "packrunner", **constant_labels: str):
        self._runner = runner
        self._prefix = prefix
        self._label_names = sorted(constant_labels)
        self._label_values = [constant_labels[name] for name in self._label_names]

    def describe(self) -> list[Metric]:
        """No up-front description: the registry calls :meth:`collect` when it needs one."""
        return []

    def collect(self) -> Iterator[Metric]:
        """One consistent snapshot per scrape."""
        stats = self._runner.stats()
        p, names, values = self._prefix, self._label_names, self._label_values

        def counter(name: str, doc: str, value: float, **extra: str) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{p}_{name}", doc, labels=[*names, *extra])
            family.add_metric([*values, *extra.values()], value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{p}_{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        yield counter("requests", "Samples accepted into the queue.", stats.requests)
        rejected = CounterMetricFamily(
            f"{p}_rejected", "Samples refused at submit time.", labels=[*names, "reason"]
        )
        rejected.add_metric([*values, "invalid"], stats.rejected_invalid)
        rejected.add_metric([*values, "overloaded"], stats.rejected_overloaded)
        yield rejected
        yield counter(
            "withdrawn", "Samples cancelled by their caller before packing.", stats.withdrawn
        )
        yield counter("completed", "Samples whose result was delivered.", stats.completed)
        yield counter("failed", "Samples failed by the device or by closing.", stats.failed)
        batches = CounterMetricFamily(
            f"{p}_batches", "Batches dispatched, by why they went.", labels=[*names, "reason"]
        )
        other = stats.batches - stats.batches_full - stats.batches_timeout
        for reason, count in (("full", stats.batches_full), ("timeout", stats.batches_timeout)):
            batches.add_metric([*values, reason], count)
        batches.add_metric([*values, "drain"], other)
        yield batches
        yield counter("batches_failed", "Batches whose device run failed.", stats.batches_failed)
        yield counter("discarded", "Samples whose deadline passed after packing.", stats.discarded)
        yield counter("nonfinite_samples", "Samples failed for NaN/Inf outputs.", stats.nonfinite)
        yield counter(
            "device_timeouts", "Batches failed by the device watchdog.", stats.device_timeouts
        )
        yield counter(
            "devices_replaced", "Hung devices replaced by a fresh one.", stats.devices_replaced
        )
        health = self._runner.health()
        yield gauge("live", "1 while the runner can serve.", float(health.live))
        yield gauge("ready", "1 while the runner should receive traffic.", float(health.ready))
        yield counter("samples", "Samples dispatched in batches.", stats.samples)
        yield counter("tokens", "Valid tokens dispatched in batches.", stats.tokens)
        yield counter("device_busy_seconds", "Time spent inside Device.run.", stats.device_busy_s)
        yield counter(
            "queue_wait_seconds",
            "Summed submit-to-packing time of samples.",
            stats.queue_wait_sum_s,
        )
        yield gauge("queue_depth", "Samples waiting to be packed.", stats.queue_depth)
        yield gauge("inflight_batches", "Batches packed and not finished.", stats.inflight_batches)
        yield gauge(
            "samples_per_batch", "Mean samples per dispatched batch.", stats.mean_samples_per_batch
        )
        yield gauge("token_fill_ratio", "Valid tokens over batch capacity.", stats.token_fill)
        histogram = HistogramMetricFamily(
            f"{p}_request_latency_seconds",
            "Submit-to-result time of samples whose batch finished.",
            labels=names,
        )
        cumulative, buckets = 0, []
        for bound, count in zip(
            stats.latency_bucket_bounds_s, stats.latency_bucket_counts, strict=False
        ):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", sum(stats.latency_bucket_counts)))
        histogram.add_metric(values, buckets, stats.latency_sum_s)
        yield histogram
