"""``packrunner bench --shapes``: shape-aware packing against one-shape packing and padding.

On one device backend and model, for PopRT's length distribution and a short-text one
(geometric, mean 20), interleaved rounds of: padded to ``[batch_size, seq_len]``, packed
(lookahead) into ``[batch_size, seq_len]``, and shape-aware packing (lookahead at each candidate
shape, :func:`~packrunner.plan_shaped`) on a bucketed device (widths ``seq_len / 8 .. seq_len``
at one token budget) and on a dynamic-axes device (any shape within the budget, widths a multiple
of 8). Runners are warmed up (which calibrates the shape-aware runners' cost models) before each
timed run. The table gives medians and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from packrunner.bench.compare import OnlineRun, measure_online
from packrunner.bench.dataset import PoprtSample, poprt_dataset, short_text_dataset
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device, ShapeSet
from packrunner.devices.simulated import ORT_DEFAULT_MODEL_COST, SimulatedDevice

__all__ = ["SHAPE_MODES", "ShapeMode", "run_shape_bench", "shape_sets"]

ShapeChoice = Literal["buckets", "dynamic", "all"]
SHAPE_MODES = ("padded", "packed", "shapes_buckets", "shapes_dynamic")
BASELINES = ("padded", "packed")


def shape_sets(batch_size: int, seq_len: int) -> dict[str, ShapeSet]:
    """The bucketed and dynamic shape sets of one token budget ``batch_size * seq_len``."""
    budget = batch_size * seq_len
    widths = sorted({max(1, seq_len // d) for d in (8, 4, 2, 1)})
    return {
        "shapes_buckets": ShapeSet.buckets([(budget // w, w) for w in widths]),
        "shapes_dynamic": ShapeSet.dynamic(
            max_rows=max(batch_size, budget // 16), max_width=seq_len, max_tokens=budget
        ),
    }


@dataclass
class ShapeMode:
    """Repeated runs of one mode on one distribution."""

    name: str
    runs: list[OnlineRun] = field(default_factory=list)
    tokens: int = 0

    @property
    def samples_per_s(self) -> float:
        """Median samples/s."""
        return statistics.median(r.samples_per_s for r in self.runs)

    @property
    def tokens_per_s(self) -> float:
        """Median valid tokens/s."""
        return statistics.median(self.tokens / r.wall_s for r in self.runs)

    def as_dict(self) -> dict[str, object]:
        """Plain data for JSON."""
        return {
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "samples_per_s_runs": [r.samples_per_s for r in self.runs],
            "samples_per_batch": statistics.median(r.mean_samples_per_batch for r in self.runs),
            "token_fill": statistics.median(r.token_fill for r in self.runs),
            "ms_per_batch": statistics.median(r.device_busy_s / r.batches * 1e3 for r in self.runs),
        }


def _factory(args: argparse.Namespace, mode: str) -> Callable[[], Device]:
    """A fresh device for ``mode``: the default model (onnx) or its simulated latency (sim)."""
    rows, width = args.batch_size, args.seq_len
    form = InputForm.PADDED if mode == "padded" else InputForm.PACKED
    shapes = shape_sets(rows, width).get(mode)
    if args.device == "sim":
        return partial(
            SimulatedDevice,
            batch_size=rows,
            seq_len=width,
            form=form,
            batch_latency_us=round(ORT_DEFAULT_MODEL_COST((rows, width)) * 1e6),
            shapes=shapes,
            latency=ORT_DEFAULT_MODEL_COST,
        )
    from packrunner.devices.onnx import OnnxDevice
    from packrunner.models import default_model_path

    options = {"batch_size": rows, "seq_len": width, "max_valid_num": args.max_valid_num}
    if shapes is None:
        return partial(OnnxDevice, default_model_path(form, **options), **_threads(args))
    path = default_model_path(form, dynamic=True, **options)
    return partial(
        OnnxDevice, path, batch_size=rows, seq_len=width, shapes=shapes, **_threads(args)
    )


def _threads(args: argparse.Namespace) -> dict[str, Any]:
    return {"intra_op_num_threads": args.threads}


def run_shape_bench(
    args: argparse.Namespace, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the comparison; print a table per distribution; return (and write) the payload."""
    choice: ShapeChoice = args.shapes
    modes = [m for m in SHAPE_MODES if m in BASELINES or choice == "all" or m == f"shapes_{choice}"]
    count = args.iterations * args.batch_size
    distributions: dict[str, Sequence[PoprtSample]] = {
        "seed": poprt_dataset(count, avg_seq_len=args.avg_seq_len, max_seq_len=args.seq_len),
        "short": short_text_dataset(count, mean_len=20, max_seq_len=args.seq_len),
    }
    payload: dict[str, Any] = {"device": args.device, "samples": count, "distributions": {}}
    for label, samples in distributions.items():
        tokens = sum(len(s["input_ids"]) for s in samples)
        results = {name: ShapeMode(name, tokens=tokens) for name in modes}
        for _ in range(args.repeats):  # interleaved rounds
            for name in modes:
                algorithm = PackAlgorithm.PADDED if name == "padded" else PackAlgorithm.LOOKAHEAD
                config = RunnerConfig(
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    max_valid_num=args.max_valid_num,
                    timeout_us=args.timeout_us,
                    algorithm=algorithm,
                    vocab_size=args.emb_size,
                )
                run = measure_online(_factory(args, name), config, samples, warmup=True)
                results[name].runs.append(run)
        payload["distributions"][label] = {n: m.as_dict() for n, m in results.items()}
        echo(_table(label, count, tokens, results))
    if args.results_dir:
        from packrunner.bench.report import to_json

        directory = Path(args.results_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "shapes.json").write_text(to_json(payload))
    return payload


def _table(label: str, count: int, tokens: int, results: dict[str, ShapeMode]) -> str:
    padded, packed = results["padded"], results["packed"]
    lines = [
        f"\n{label} distribution: {count} samples, mean length {tokens / count:.1f}",
        "| mode | samples/s | tokens/s | vs padded | vs packed [B,S] | samples/batch "
        "| token fill | ms/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, mode in results.items():
        data = mode.as_dict()
        lines.append(
            f"| {name} | {mode.samples_per_s:.1f} | {mode.tokens_per_s:.0f} "
            f"| {mode.samples_per_s / padded.samples_per_s:.2f}x "
            f"| {mode.samples_per_s / packed.samples_per_s:.2f}x "
            f"| {data['samples_per_batch']:.2f} | {data['token_fill']:.1%} "
            f"| {data['ms_per_batch']:.1f} |"
        )
    return "\n".join(lines)
