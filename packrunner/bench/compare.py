"""Online throughput, measured through the public API: one run, and algorithms side by side.

Used by ``packrunner compare`` and every online mode of ``packrunner bench``. Repeats are
interleaved and summarised by medians and ratios (the machines are shared and noisy: never
compare single runs).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from packrunner.bench.accuracy import OutputAccuracy, compare_results
from packrunner.bench.dataset import PoprtSample
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.packing import drain_queue
from packrunner.runner import PackRunner, Result

__all__ = [
    "AlgorithmSummary",
    "OnlineRun",
    "accuracy_against",
    "compare_algorithms",
    "format_accuracy",
    "format_comparison",
    "measure_online",
]


@dataclass(frozen=True, slots=True)
class OnlineRun:
    """One online run: every sample submitted at once through ``execute_async``.

    ``results`` holds each sample's outputs (in sample order) when they were kept.
    """

    samples: int
    wall_s: float
    batches: int
    mean_samples_per_batch: float
    token_fill: float
    device_busy_s: float
    results: tuple[Result, ...] | None = None

    @property
    def samples_per_s(self) -> float:
        """Throughput."""
        return self.samples / self.wall_s


def measure_online(
    device_factory: Callable[[], Device | Sequence[Device]],
    config: RunnerConfig,
    samples: Sequence[PoprtSample],
    *,
    keep_results: bool = False,
    warmup: bool = False,
) -> OnlineRun:
    """Submit every sample at once (PopRT's online mode) and time until all are back.

    With ``warmup``, :meth:`~packrunner.PackRunner.warmup` runs first, untimed (it calibrates
    the cost model of a device with several shapes); its batches are not counted.
    """

    async def run() -> OnlineRun:
        async with PackRunner(device_factory(), config) as runner:
            before = None
            if warmup:
                await runner.warmup_async()
                before = runner.stats()
            # More samples than the queue holds are fed as slots free up, never rejected.
            slots = asyncio.Semaphore(config.max_queue_size)

            async def one(sample: PoprtSample) -> Result:
                async with slots:
                    return await runner.execute_async(sample)

            started = time.perf_counter()
            results = await asyncio.gather(*(one(s) for s in samples))
            wall = time.perf_counter() - started
            stats = runner.stats()
        if before is None:
            return OnlineRun(
                samples=len(samples),
                wall_s=wall,
                batches=stats.batches,
                mean_samples_per_batch=stats.mean_samples_per_batch,
                token_fill=stats.token_fill,
                device_busy_s=stats.device_busy_s,
                results=tuple(results) if keep_results else None,
            )
        batches = stats.batches - before.batches  # the timed part only
        token_slots = stats.token_slots - before.token_slots
        return OnlineRun(
            samples=len(samples),
            wall_s=wall,
            batches=batches,
            mean_samples_per_batch=(stats.samples - before.samples) / max(batches, 1),
            token_fill=(stats.tokens - before.tokens) / max(token_slots, 1),
            device_busy_s=stats.device_busy_s - before.device_busy_s,
            results=tuple(results) if keep_results else None,
        )

    return asyncio.run(run())


@dataclass(frozen=True, slots=True)
class AlgorithmSummary:
    """Medians over the repeats of one algorithm, and its ratio to the padded baseline.

    ``queued_samples_per_batch`` is the deterministic figure when the whole dataset is queued
    before the first batch forms (:func:`~packrunner.packing.drain_queue`).
    """

    algorithm: PackAlgorithm
    runs: tuple[OnlineRun, ...]
    ratio_to_padded: float
    queued_samples_per_batch: float

    @property
    def samples_per_s(self) -> float:
        """Median throughput."""
        return statistics.median(r.samples_per_s for r in self.runs)

    @property
    def mean_samples_per_batch(self) -> float:
        """Median samples per batch."""
        return statistics.median(r.mean_samples_per_batch for r in self.runs)

    @property
    def token_fill(self) -> float:
        """Median token fill."""
        return statistics.median(r.token_fill for r in self.runs)

    def as_dict(self) -> dict[str, object]:
        """Plain data for JSON (runs' results left out)."""
        return {
            "algorithm": self.algorithm.value,
            "samples_per_s": self.samples_per_s,
            "samples_per_s_runs": [r.samples_per_s for r in self.runs],
            "samples_per_batch": self.mean_samples_per_batch,
            "queued_samples_per_batch": self.queued_samples_per_batch,
            "token_fill": self.token_fill,
            "ratio_to_padded": self.ratio_to_padded,
        }


def compare_algorithms(
    device_factory: Callable[[PackAlgorithm], Device | Sequence[Device]],
    base_config: RunnerConfig,
    samples: Sequence[PoprtSample],
    algorithms: Sequence[PackAlgorithm],
    *,
    repeats: int = 3,
    progress: Callable[[int, PackAlgorithm, OnlineRun], None] | None = None,
) -> list[AlgorithmSummary]:
    """Run every algorithm ``repeats`` times, interleaved (A B C A B C ...), and summarise.

    Interleaving spreads slow phases of a noisy host over all algorithms instead of one. The
    ratio to padded is the median of per-round ratios (each round measured side by side).

    Args:
        device_factory: A fresh device (or devices) for each run of an algorithm.
        base_config: Shapes and limits; each run replaces its algorithm.
        samples: Every run submits all of them at once.
        algorithms: In the order they run within a round.
        repeats: Rounds.
        progress: Called after each run with its round number (from 0), algorithm and result.
    """
    runs: dict[PackAlgorithm, list[OnlineRun]] = {a: [] for a in algorithms}
    for round_number in range(repeats):
        for algorithm in algorithms:
            run = measure_online(
                partial(device_factory, algorithm),
                replace(base_config, algorithm=algorithm),
                samples,
                keep_results=round_number == 0,
            )
            runs[algorithm].append(run)
            if progress is not None:
                progress(round_number, algorithm, run)
    lengths = [len(s[base_config.dynamic_input_name]) for s in samples]
    padded = runs.get(PackAlgorithm.PADDED)
    summaries = []
    for algorithm, algorithm_runs in runs.items():
        if padded is None:
            ratio = float("nan")
        else:
            ratio = statistics.median(
                r.samples_per_s / p.samples_per_s
                for r, p in zip(algorithm_runs, padded, strict=True)
            )
        queued = drain_queue(
            lengths,
            algorithm=algorithm,
            batch_size=base_config.batch_size,
            seq_len=base_config.seq_len,
            max_valid_num=base_config.max_valid_num,
            lookahead=base_config.lookahead,
        )
        summaries.append(
            AlgorithmSummary(algorithm, tuple(algorithm_runs), ratio, len(samples) / len(queued))
        )
    return summaries


def accuracy_against(
    summaries: Sequence[AlgorithmSummary], lengths: Sequence[int], *, baseline: PackAlgorithm
) -> dict[PackAlgorithm, dict[str, OutputAccuracy]]:
    """Per algorithm (baseline excluded), each output's accuracy against the baseline's results
    from the first round; empty when the baseline did not run."""
    reference = next((s for s in summaries if s.algorithm is baseline), None)
    if reference is None or reference.runs[0].results is None:
        return {}
    expected = reference.runs[0].results
    return {
        summary.algorithm: compare_results(expected, results, lengths)
        for summary in summaries
        if summary.algorithm is not baseline and (results := summary.runs[0].results) is not None
    }


def format_accuracy(
    accuracy: Mapping[PackAlgorithm, Mapping[str, OutputAccuracy]], *, baseline: PackAlgorithm
) -> str:
    """Per algorithm, MAE and max abs diff of every output against the baseline's results."""
    lines = [f"Accuracy against {baseline.value} (over each sample's valid tokens):"]
    for algorithm, report in accuracy.items():
        for name, output in report.items():
            lines.append(
                f"  {algorithm.value:<11} {name:<20} mean MAE {output.mean_mae:.3e}  "
                f"max abs diff {output.max_abs_diff:.3e}"
            )
    return "\n".join(lines)


def format_comparison(summaries: Sequence[AlgorithmSummary], *, title: str) -> str:
    """A plain-text table of the summaries."""
    header = (
        f"{'algorithm':<11} {'samples/s':>10} {'samples/batch':>14} {'queued/batch':>13} "
        f"{'token fill':>11} {'vs padded':>10}"
    )
    lines = [title, header, "-" * len(header)]
    lines.extend(
        f"{s.algorithm.value:<11} {s.samples_per_s:>10.1f} {s.mean_samples_per_batch:>14.2f} "
        f"{s.queued_samples_per_batch:>13.2f} {s.token_fill:>10.1%} {s.ratio_to_padded:>9.2f}x"
        for s in summaries
    )
    lines.append(
        "queued/batch: samples per batch when the whole dataset is queued before the first batch"
    )
    return "\n".join(lines)
