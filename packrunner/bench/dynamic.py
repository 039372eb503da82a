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
(:func:`run_dynamic`) times everything after that: validation (the runner's
:class:`~packrunner._codec.BatchFeeder`), feed building, the device, and cutting outputs back.
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
from packrunner.packing import PackPlan, build_feeds, unpack_outputs

__all__ = ["DynamicBatch", "DynamicRun", "DynamicStrategy", "plan_dynamic", "run_dynamic"]


class DynamicStrategy(enum.StrEnum):
    """Which samples share a batch (each batch padded to its longest)."""

    FIFO = "fifo"
    SORTED_WINDOW = "sorted_window"
    SORTED_ORACLE = "sorted_oracle"


@dataclass(frozen=True, slots=True)
class DynamicBatch:
    """One batch of a dynamic-shape peer: ``plan`` (one sample per row) at ``[rows, width]``."""

    plan: PackPlan
    width: int

    @property
    def rows(self) -> int:
        """Rows of the batch: its sample count."""
        return self.plan.num_samples


def plan_dynamic(
    lengths: Sequence[int], strategy: DynamicStrategy, *, batch_size: int, window: int
) -> list[DynamicBatch]:
    """The batches of ``strategy`` over a queue of ``lengths`` (oldest first), in dispatch order.

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


def _padded_batch(group: Sequence[int], lengths: Sequence[int]) -> DynamicBatch:
    group_lengths = np.array([lengths[i] for i in group], dtype=np.int64)
    width = int(group_lengths.max())
    rows = np.arange(len(group), dtype=np.int64)
    plan = PackPlan(
        tuple(group), group_lengths, rows * width, np.ones(len(group), dtype=np.int64), True
    )
    return DynamicBatch(plan, width)


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
    batches: Sequence[DynamicBatch],
    config: RunnerConfig,
) -> DynamicRun:
    """Validate, feed and run every batch at its own ``[rows, width]`` on an opened ``device``.

    ``device`` must accept any batch shape up to ``config.seq_len`` wide (a padded model with
    dynamic axes); samples are validated by the same :class:`~packrunner._codec.BatchFeeder`
    packrunner uses (``config`` with ``algorithm=padded``), and feeds are cast to its dtypes.
    """
    feeder = BatchFeeder(device, replace(config, algorithm=PackAlgorithm.PADDED))
    specs = device.input_specs
    mask_input = config.mask_input_name if config.mask_input_name in specs else None
    position_input = config.position_input_name if config.position_input_name in specs else None
    results: list[dict[str, Any]] = [{} for _ in samples]
    busy = 0.0
    padded_tokens = 0
    started = time.perf_counter()
    prepared = [feeder.prepare(sample) for sample in samples]
    for batch in batches:
        plan = batch.plan
        chosen = [prepared[i] for i in plan.chosen]
        feeds: dict[str, Any] = build_feeds(
            plan,
            {name: [s.tokens[name] for s in chosen] for name in chosen[0].tokens},
            batch_size=batch.rows,
            seq_len=batch.width,
            position_input=position_input,
            mask_input=mask_input,
        )
        for name, array in feeds.items():
            if array.dtype != specs[name].dtype:
                feeds[name] = array.astype(specs[name].dtype)
        run_started = time.perf_counter()
        outputs = device.run(feeds)
        busy += time.perf_counter() - run_started
        padded_tokens += batch.rows * batch.width
        pieces = unpack_outputs(plan, outputs, feeder.outputs, seq_len=batch.width)
        for index, result in zip(plan.chosen, pieces, strict=True):
            results[index] = result
    wall = time.perf_counter() - started
    valid = sum(s.length for s in prepared)
    return DynamicRun(len(samples), len(batches), wall, busy, padded_tokens, valid, results)
