"""Building blocks shared by ``packrunner compare``/``bench`` and ``benchmarks/``.

PopRT's synthetic dataset, an online throughput measurement through the public API, and
interleaved repeats summarised by medians and ratios (the machines are shared and noisy: never
compare single runs).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from packrunner.bench.accuracy import compare_results
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.runner import PackRunner, Result

__all__ = [
    "AlgorithmSummary",
    "OnlineRun",
    "PoprtSample",
    "compare_algorithms",
    "format_accuracy",
    "format_comparison",
    "measure_online",
    "poprt_dataset",
]

PoprtSample = dict[str, npt.NDArray[np.int32]]


def poprt_dataset(
    n: int,
    *,
    avg_seq_len: int = 128,
    max_seq_len: int = 256,
    emb_size: int = 30522,
    seed: int = 2023,
) -> list[PoprtSample]:
    """PopRT's ``get_synthetic_data``: same generator, same calls, same order, same values.

    Lengths are ``clip(int32(normal(avg, avg)), 1, max)``; each sample then draws its
    ``input_ids`` in ``[0, emb_size)`` and its ``token_type_ids`` in ``{0, 1}``.
    """
    # PopRT's example seeds numpy's legacy global generator; RandomState replays the same stream
    # without touching global state.
    legacy = np.random.RandomState(seed)
    lengths = np.clip(
        legacy.normal(avg_seq_len, avg_seq_len, size=n).astype(np.int32), 1, max_seq_len
    )
    samples: list[PoprtSample] = []
    for length in lengths:
        input_ids = legacy.randint(0, emb_size, (length,)).astype(np.int32)
        token_type_ids = legacy.randint(0, 2, (length,)).astype(np.int32)
        samples.append({"input_ids": input_ids, "token_type_ids": token_type_ids})
    return samples


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
) -> OnlineRun:
    """Submit every sample at once (PopRT's online mode) and time until all are back."""

    async def run() -> OnlineRun:
        async with PackRunner(device_factory(), config) as runner:
            # More samples than the queue holds are fed as slots free up, never rejected.
            slots = asyncio.Semaphore(config.max_queue_size)

            async def one(sample: PoprtSample) -> Result:
                async with slots:
                    return await runner.execute_async(sample)

            started = time.perf_counter()
            results = await asyncio.gather(*(one(s) for s in samples))
            wall = time.perf_counter() - started
            stats = runner.stats()
        return OnlineRun(
            samples=len(samples),
            wall_s=wall,
            batches=stats.batches,
            mean_samples_per_batch=stats.mean_samples_per_batch,
            token_fill=stats.token_fill,
            device_busy_s=stats.device_busy_s,
            results=tuple(results) if keep_results else None,
        )

    return asyncio.run(run())


@dataclass(frozen=True, slots=True)
class AlgorithmSummary:
    """Medians over the repeats of one algorithm, and its ratio to the padded baseline."""

    algorithm: PackAlgorithm
    runs: tuple[OnlineRun, ...]
    ratio_to_padded: float

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


def compare_algorithms(
    device_factory: Callable[[PackAlgorithm], Device | Sequence[Device]],
    base_config: RunnerConfig,
    samples: Sequence[PoprtSample],
    algorithms: Sequence[PackAlgorithm],
    *,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[AlgorithmSummary]:
    """Run every algorithm ``repeats`` times, interleaved (A B C A B C ...), and summarise.

    Interleaving spreads slow phases of a noisy host over all algorithms instead of one. The
    ratio to padded is the median of per-round ratios (each round measured side by side).
    """
    runs: dict[PackAlgorithm, list[OnlineRun]] = {a: [] for a in algorithms}
    for round_number in range(repeats):
        for algorithm in algorithms:
            config = _with_algorithm(base_config, algorithm)
            run = measure_online(
                partial(device_factory, algorithm),
                config,
                samples,
                keep_results=round_number == 0,
            )
            runs[algorithm].append(run)
            if progress is not None:
                progress(
                    f"round {round_number + 1}/{repeats} {algorithm.value:>9}: "
                    f"{run.samples_per_s:8.1f} samples/s, {run.mean_samples_per_batch:5.2f}/batch"
                )
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
        summaries.append(AlgorithmSummary(algorithm, tuple(algorithm_runs), ratio))
    return summaries


def format_accuracy(
    summaries: Sequence[AlgorithmSummary], lengths: Sequence[int], *, baseline: PackAlgorithm
) -> str:
    """Per algorithm, MAE and max abs diff of every output against the baseline's results."""
    reference = next((s for s in summaries if s.algorithm is baseline), None)
    if reference is None or reference.runs[0].results is None:
        return ""
    lines = [f"Accuracy against {baseline.value} (over each sample's valid tokens):"]
    for summary in summaries:
        results = summary.runs[0].results
        if summary.algorithm is baseline or results is None:
            continue
        report = compare_results(reference.runs[0].results, results, lengths)
        for name, accuracy in report.items():
            lines.append(
                f"  {summary.algorithm.value:<11} {name:<20} mean MAE {accuracy.mean_mae:.3e}  "
                f"max abs diff {accuracy.max_abs_diff:.3e}"
            )
    return "\n".join(lines)


def format_comparison(summaries: Sequence[AlgorithmSummary], *, title: str) -> str:
    """A plain-text table of the summaries."""
    header = (
        f"{'algorithm':<11} {'samples/s':>10} {'samples/batch':>14} {'token fill':>11} "
        f"{'vs padded':>10}"
    )
    lines = [title, header, "-" * len(header)]
    lines.extend(
        f"{s.algorithm.value:<11} {s.samples_per_s:>10.1f} {s.mean_samples_per_batch:>14.2f} "
        f"{s.token_fill:>10.1%} {s.ratio_to_padded:>9.2f}x"
        for s in summaries
    )
    return "\n".join(lines)


def _with_algorithm(config: RunnerConfig, algorithm: PackAlgorithm) -> RunnerConfig:
    from dataclasses import replace

    return replace(config, algorithm=algorithm)
