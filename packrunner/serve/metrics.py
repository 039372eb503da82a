"""``GET /metrics``: the service's Prometheus metrics, with the ``packrunner_`` prefix.

Each server owns a private registry (so several servers can live in one process, as in tests):

* the runner's own counters, gauges and latency histogram through
  :class:`packrunner.prometheus.RunnerCollector` (``packrunner_requests_total``,
  ``packrunner_rejected_total{reason}``, ``packrunner_withdrawn_total``,
  ``packrunner_queue_depth``, ``packrunner_token_fill_ratio`` ...);
* the front ends' metrics below, ``packrunner_server_*``: requests by route/protocol/status,
  failures by reason, request / queue / tokenisation / device duration histograms, in-flight
  requests, samples per batch and batch token fill per batch, timed-out sequences.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from packrunner.prometheus import RunnerCollector
from packrunner.runner import PackRunner

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FILL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServeMetrics:
    """The service's metrics and their registry.

    Args:
        model: Value of the ``model`` label.
        max_valid_num: Most samples in one batch (bounds the samples-per-batch histogram).
    """

    def __init__(self, model: str, max_valid_num: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model}
        p, r = "packrunner_server", self.registry
        self.requests = Counter(
            f"{p}_requests", "Requests answered, by route, protocol and status.",
            ["route", "protocol", "status"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            f"{p}_failures", "Failed requests, by reason.", ["reason"], registry=r
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds", "Request time, receipt to answer.",
            ["route", "protocol"], buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            f"{p}_queue_duration_seconds",
            "Per request: submit to the start of the device run that completed it.",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.tokenization_duration = Histogram(
            f"{p}_tokenization_duration_seconds", "Tokenising one request's texts.",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.device_duration = Histogram(
            f"{p}_device_duration_seconds", "One batch on the device.",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.batch_samples = Histogram(
            f"{p}_batch_samples", "Sequences packed into one batch.",
            buckets=tuple(sorted({1, 2, 4, 8, 16, 24, 32, max_valid_num})), registry=r,
        )  # fmt: skip
        self.batch_token_fill = Histogram(
            f"{p}_batch_token_fill_ratio",
            "Real tokens over batch capacity, per batch (the packing gain).",
            buckets=_FILL, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(f"{p}_in_flight_requests", "Requests being served.", registry=r)
        self.rejected = Counter(
            f"{p}_rejected", "Requests refused at admission, by reason.", ["reason"], registry=r
        )
        self.timed_out = Counter(f"{p}_timed_out", "Requests whose deadline expired.", registry=r)
        self._labels = labels

    def watch_runner(self, runner: PackRunner) -> None:
        """Export the runner's own statistics (queue size, withdrawn, rejected ...)."""
        self.registry.register(RunnerCollector(runner, **self._labels))

    def watch_in_flight(self, count: Callable[[], float]) -> None:
        """Report ``count()`` as the in-flight gauge at each scrape."""
        self.in_flight.set_function(count)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
