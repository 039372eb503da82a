"""Output of ``packrunner bench``: terminal tables, the JSON results file, CSV dumps, PNG plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "POPRT_IPU_SAMPLES_PER_S",
    "dump_results_csv",
    "plot_all",
    "write_json",
]

#: PopRT's published figures (BERT-base SQuAD, [16, 256], IPU, fp16): context, not comparable
#: hardware. From graphcore/PopRT examples/packed_bert_example/README.md and the packing docs.
POPRT_IPU_SAMPLES_PER_S: dict[str, float] = {
    "original": 1860.98,
    "offline_unpack_repack": 2542.82,
    "online_unpack_repack": 2857.60,
    "offline_attention_mask": 2782.59,
    "online_first_fit": 3248.62,
    "online_next_fit": 2840.56,
}


def dump_results_csv(
    path: Path, results: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> None:
    """PopRT's ``dump_results`` format: one row per sample, one list-valued cell per output.

    Like PopRT's example, rows have no header and each cell is the Python list of that output's values
    (here over the sample's valid tokens).
    """
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(names))
        for result in results:
            writer.writerow({name: np.asarray(result[name]).tolist() for name in names})


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write results as indented JSON (numpy scalars converted)."""

    def default(value: object) -> object:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")


def plot_all(
    directory: Path,
    *,
    throughput: Mapping[str, float],
    ratios: Mapping[str, float],
    closed_loop: Mapping[str, npt.NDArray[np.float64]],
    sweep: Mapping[str, Sequence[Mapping[str, Any]]],
    title: str,
) -> list[Path]:
    """Three PNGs: latency CDF per mode, throughput by mode, latency vs offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, latencies in closed_loop.items():
        values = np.sort(np.asarray(latencies) * 1e3)
        axes.plot(values, np.arange(1, len(values) + 1) / len(values), label=mode)
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("fraction of requests")
    axes.set_title(f"Closed-loop latency CDF\n{title}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    written.append(_save(figure, directory / "latency_cdf.png"))

    figure, axes = plt.subplots(figsize=(8, 4.5))
    modes = list(throughput)
    bars = axes.barh(modes, [throughput[m] for m in modes], color="#4C72B0")
    for bar, mode in zip(bars, modes, strict=True):
        ratio = ratios.get(mode)
        label = f" {throughput[mode]:.0f}" + (f"  ({ratio:.2f}x)" if ratio else "")
        axes.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8
        )
    axes.invert_yaxis()
    axes.set_xlabel("samples/s (ratio to online padded)")
    axes.set_title(f"Throughput by mode\n{title}", fontsize=9)
    axes.set_xlim(0, max(throughput.values()) * 1.3)
    written.append(_save(figure, directory / "throughput_by_mode.png"))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, points in sweep.items():
        offered = [p["offered_rate"] for p in points]
        axes.plot(offered, [p["p50_ms"] for p in points], marker="o", label=f"{mode} p50")
        axes.plot(offered, [p["p99_ms"] for p in points], marker="x", ls="--", label=f"{mode} p99")
    axes.set_xlabel("offered load (samples/s, Poisson)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"Latency vs offered load\n{title}", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    written.append(_save(figure, directory / "latency_vs_load.png"))
    return written


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
