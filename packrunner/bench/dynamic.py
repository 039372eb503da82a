"""Dynamic-shape peers: the batchers a user of a dynamic-axes runtime would pick instead.

Each runs the padded model with dynamic axes (one onnxruntime session, any ``[rows, width]``):
batches of up to ``batch_size`` samples, one per row, each batch padded to its own longest
sample. They differ only in which samples share a batch (:class:`DynamicStrategy`):

* ``fifo``: arrival order (TEI's queue, Triton's dynamic batcher);
* ``sorted_window``: the same window of waiting samples packrunner plans over, sorted by
  length (the best online alternative: TEI issue #65's queue ordering);
* ``sorted_oracle``: every sample sorted by length before the first batch (offline; the least
  padding any one-sample-per-row batcher can reach).

Like packrunner's online mode in ``bench``, the whole dataset is queued before the first batch,
so an online batcher's batches are exactly the ones :func:`plan_dynamic` lists. A run
(:func:`run_dynamic`) times everything after that: validation, feed building, the device,
output checks and cutting outputs back, all by the runner's own
:class:`~packrunner._codec.BatchFeeder` (each plan carries its batch's ``shape``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from packrunner._codec import BatchFeeder
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.packing import PackPlan

__all__ = ["DynamicRun", "DynamicStrategy", "plan_dynamic", "run_dynamic"]


class DynamicStrategy(enum.StrEnum):
    """Which samples share a batch (each batch padded to its longest)."""

    FIFO = "fifo"
    SORTED_WINDOW = "sorted_window"
    SORTED_ORACLE = "sorted_oracle"


def plan_dynamic(
    lengths: Sequence[int], strategy: DynamicStrategy, *, batch_size: int, window: int
) -> list[PackPlan]:
    """The batches of ``strategy`` over a queue of ``lengths`` (oldest first), in dispatch order:
    one sample per row, each plan's ``shape`` ``(samples, longest)``.

    Args:
        lengths: Sample lengths, oldest first.
        strategy: How samples are grouped.
        batch_size: Most samples (rows) per batch.
        window: ``sorted_window`` only: how many of the oldest waiting samples are sorted
            together (packrunner's lookahead window).
    """
    order = list(range(len(lengths)))
    if strategy is DynamicStrategy.SORTED_ORACLE:
        order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep arrival order
    elif strategy is DynamicStrategy.SORTED_WINDOW:
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: lengths[i])
        ]
    elif strategy is not DynamicStrategy.FIFO:  # pragma: no cover - exhaustive over the enum
        raise AssertionError(f"unknown strategy {strategy!r}")
    if strategy is DynamicStrategy.SORTED_WINDOW:
        # A batch never spans two windows: the second window was not waiting yet.
        groups = [
            order[start : min(start + batch_size, (start // window + 1) * window)]
            for start in _group_starts(len(order), batch_size, window)
        ]
    else:
        groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [_padded_batch(group, lengths) for group in groups]


def _group_starts(count: int, batch_size: int, window: int) -> list[int]:
    starts: list[int] = []
    for window_start in range(0, count, window):
        end = min(window_start + window, count)
        starts.extend(range(window_start, end, batch_size))
    return starts


def _padded_batch(group: Sequence[int], lengths: Sequence[int]) -> PackPlan:
    group_lengths = np.array([lengths[i] for i in group], dtype=np.int64)
    width = int(group_lengths.max())
    rows = np.arange(len(group), dtype=np.int64)
    ones = np.ones(len(group), dtype=np.int64)
    return PackPlan(tuple(group), group_lengths, rows * width, ones, True, (len(group), width))


@dataclass(frozen=True, slots=True)
class DynamicRun:
    """One run of a dynamic-shape peer over a whole dataset."""

    samples: int
    batches: int
    wall_s: float
    device_busy_s: float
    padded_tokens: int
    valid_tokens: int
    results: list[dict[str, Any]]

    @property
    def samples_per_s(self) -> float:
        """Throughput."""
        return self.samples / self.wall_s

    @property
    def mean_samples_per_batch(self) -> float:
        """Samples per batch."""
        return self.samples / self.batches

    @property
    def token_fill(self) -> float:
        """Valid tokens / tokens the device computed (``rows * width`` summed over batches)."""
        return self.valid_tokens / self.padded_tokens


def run_dynamic(
    device: Device,
    samples: Sequence[Mapping[str, Any]],
    batches: Sequence[PackPlan],
    config: RunnerConfig,
) -> DynamicRun:
    """Validate, feed and run every batch at its own shape on an opened ``device``.

    ``device`` must run every batch's shape (a padded model with dynamic axes, see
    :meth:`~packrunner.bench.devices.DeviceSet.make_dynamic`). Samples are validated, feeds
    built and outputs checked and cut back by the same :class:`~packrunner._codec.BatchFeeder`
    packrunner uses (``config`` with ``algorithm=padded``).
    """
    feeder = BatchFeeder(device, replace(config, algorithm=PackAlgorithm.PADDED))
    results: list[dict[str, Any]] = [{} for _ in samples]
    busy = 0.0
    padded_tokens = 0
    started = time.perf_counter()
    prepared = [feeder.prepare(sample) for sample in samples]
    for plan in batches:
        feeds = feeder.feeds(plan, [prepared[i] for i in plan.chosen])
        run_started = time.perf_counter()
        outputs = device.run(feeds)
        busy += time.perf_counter() - run_started
        rows, width = feeder.shape_of(plan)
        padded_tokens += rows * width
        for index, result in zip(plan.chosen, feeder.results(plan, outputs), strict=True):
            results[index] = result
    wall = time.perf_counter() - started
    valid = sum(s.length for s in prepared)
    return DynamicRun(len(samples), len(batches), wall, busy, padded_tokens, valid, results)
