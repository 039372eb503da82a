"""Offline runs: the whole dataset packed (or padded) up front, then run batch after batch.

This is PopRT's example's "Original" and "Offline pack" path: packing time is reported separately,
throughput counts device execution and unpacking only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from packrunner._codec import BatchFeeder
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.packing import PackPlan, drain_queue, pack_offline, unpack_outputs

__all__ = ["OfflineRun", "plan_dataset", "run_offline"]


@dataclass(frozen=True, slots=True)
class OfflineRun:
    """One offline run."""

    samples: int
    batches: int
    pack_s: float
    wall_s: float
    device_busy_s: float
    results: list[dict[str, Any]]

    @property
    def samples_per_s(self) -> float:
        """Throughput of the execution phase."""
        return self.samples / self.wall_s

    @property
    def mean_samples_per_batch(self) -> float:
        """Samples per batch."""
        return self.samples / self.batches


def plan_dataset(
    lengths: Sequence[int],
    form: InputForm,
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
) -> list[PackPlan]:
    """Batches for a whole dataset in ``form``: ``PADDED`` (one sample per row, in order),
    ``PACKED`` (our best offline packing) or ``UNPACK_REPACK`` (across rows)."""
    if form is InputForm.PADDED:
        return drain_queue(
            lengths,
            algorithm=PackAlgorithm.PADDED,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=batch_size,
        )
    return pack_offline(
        lengths,
        batch_size=batch_size,
        seq_len=seq_len,
        max_valid_num=max_valid_num,
        across_rows=form is InputForm.UNPACK_REPACK,
    )


def run_offline(
    device: Device,
    samples: Sequence[Mapping[str, Any]],
    plans: Sequence[PackPlan],
    config: RunnerConfig,
) -> OfflineRun:
    """Build every batch's feeds (timed as packing), then run them in order on ``device``.

    Feeds come from the same :class:`~packrunner._codec.BatchFeeder` a runner with ``config``
    would use (validation included), so offline and online runs feed identical tensors.
    """
    feeder = BatchFeeder(device, config)
    started = time.perf_counter()
    all_feeds = [
        feeder.feeds(plan, [feeder.prepare(samples[i]) for i in plan.chosen]) for plan in plans
    ]
    pack_s = time.perf_counter() - started

    results: list[dict[str, Any]] = [{} for _ in samples]
    busy = 0.0
    started = time.perf_counter()
    for plan, feeds in zip(plans, all_feeds, strict=True):
        run_started = time.perf_counter()
        outputs = device.run(feeds)
        busy += time.perf_counter() - run_started
        for index, result in zip(
            plan.chosen,
            unpack_outputs(plan, outputs, feeder.outputs, seq_len=config.seq_len),
            strict=True,
        ):
            results[index] = result
    wall = time.perf_counter() - started
    return OfflineRun(len(samples), len(plans), pack_s, wall, busy, results)
