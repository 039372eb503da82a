"""RunnerStats: a frozen snapshot of a runner's counters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunnerStats"]


@dataclass(frozen=True, slots=True)
class RunnerStats:
    """Counters since the runner started, taken at one instant.

    Attributes:
        requests: Samples accepted (queued).
        rejected_invalid: Samples refused by validation.
        rejected_overloaded: Samples refused because the queue was full.
        withdrawn: Samples cancelled, or past their deadline, before being packed.
        completed: Samples whose result was delivered.
        failed: Samples that got a DeviceError or RunnerClosedError.
        batches: Batches run on a device (successfully or not).
        batches_full: Batches dispatched because they could take no more.
        batches_timeout: Batches dispatched because the oldest sample's timeout expired.
        batches_failed: Batches whose device run raised.
        samples: Samples dispatched in batches.
        tokens: Valid tokens dispatched in batches.
        mean_samples_per_batch: ``samples / batches``.
        token_fill: Valid tokens over batch capacity, ``tokens / token_slots``.
        queue_depth: Samples waiting to be packed now.
        inflight_batches: Batches packed and not yet finished now.
        device_busy_s: Total time spent inside ``Device.run``.
        latency_sum_s: Sum over finished samples of submit-to-result time.
        queue_wait_sum_s: Sum over dispatched samples of submit-to-packing time.
        latency_bucket_bounds_s: Upper bounds of the latency histogram's buckets (seconds).
        latency_bucket_counts: Finished samples per bucket (not cumulative); one more entry
            than bounds, for latencies above the last bound.
        discarded: Samples whose deadline passed after packing (result discarded).
        nonfinite: Samples failed because their outputs held NaN/Inf (``check_finite``).
        device_timeouts: Batches failed by the device watchdog (``device_timeout_s``).
        devices_replaced: Hung devices replaced by a fresh one.
        token_slots: ``rows * width`` summed over the batches dispatched (``batches *
            batch_size * seq_len`` on a single-shape device).

    Every accepted sample ends up in exactly one of ``completed``, ``failed``, ``withdrawn``
    and ``discarded`` (``nonfinite`` ones are also counted in ``failed``).
    """

    requests: int
    rejected_invalid: int
    rejected_overloaded: int
    withdrawn: int
    completed: int
    failed: int
    batches: int
    batches_full: int
    batches_timeout: int
    batches_failed: int
    samples: int
    tokens: int
    mean_samples_per_batch: float
    token_fill: float
    queue_depth: int
    inflight_batches: int
    device_busy_s: float
    latency_sum_s: float = 0.0
    queue_wait_sum_s: float = 0.0
    latency_bucket_bounds_s: tuple[float, ...] = ()
    latency_bucket_counts: tuple[int, ...] = ()
    discarded: int = 0
    nonfinite: int = 0
    device_timeouts: int = 0
    devices_replaced: int = 0
    token_slots: int = 0

    @property
    def finished(self) -> int:
        """Samples whose batch finished (with results or a device error)."""
        return sum(self.latency_bucket_counts)

    @property
    def mean_latency_s(self) -> float:
        """Mean submit-to-result time of finished samples."""
        return self.latency_sum_s / self.finished if self.finished else 0.0
