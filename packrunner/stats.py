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
        withdrawn: Samples cancelled or timed out by their caller before being packed.
        completed: Samples whose result was delivered.
        failed: Samples that got a DeviceError or RunnerClosedError.
        batches: Batches run on a device (successfully or not).
        batches_full: Batches dispatched because they could take no more.
        batches_timeout: Batches dispatched because the oldest sample's timeout expired.
        batches_failed: Batches whose device run raised.
        samples: Samples dispatched in batches.
        tokens: Valid tokens dispatched in batches.
        mean_samples_per_batch: ``samples / batches``.
        token_fill: Valid tokens over batch capacity,
            ``tokens / (batches * batch_size * seq_len)``.
        queue_depth: Samples waiting to be packed now.
        inflight_batches: Batches packed and not yet finished now.
        device_busy_s: Total time spent inside ``Device.run``.
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
