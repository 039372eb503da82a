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
    "KIND_COLOURS",
    "TARGET_COLOURS",
    "dump_results_csv",
    "plot_all",
    "to_json",
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

    Like PopRT's example, rows have no header and each cell is the Python list of that output's
    values (here over the sample's valid tokens).
    """
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(names))
        for result in results:
            writer.writerow({name: np.asarray(result[name]).tolist() for name in names})


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write results as indented JSON (numpy scalars and paths converted)."""
    path.write_text(to_json(payload) + "\n")


def to_json(payload: Mapping[str, Any]) -> str:
    """Results as indented JSON (numpy scalars and paths converted)."""

    def default(value: object) -> object:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    return json.dumps(payload, indent=2, default=default)


#: One colour per mode kind in the throughput plot, and per latency target in the others.
KIND_COLOURS: dict[str, str] = {
    "offline": "#8c8c8c",
    "online": "#4C72B0",
    "peer": "#DD8452",
    "dynamic": "#55A868",
}
TARGET_COLOURS: dict[str, str] = {
    "online_padded": "#8c8c8c",
    "online_lookahead": "#4C72B0",
    "peer_batched": "#DD8452",
}


def plot_all(
    directory: Path,
    payload: Mapping[str, Any],
    closed_loop: Mapping[str, npt.NDArray[np.float64]],
) -> list[Path]:
    """Three PNGs from a ``packrunner bench`` payload and its closed-loop latencies (seconds):
    latency CDF per target, throughput by mode, latency vs offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import ScalarFormatter

    title = payload["title"]
    written: list[Path] = []

    # Latency CDF: log x so a long peer tail does not squash the range where targets differ.
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for target, latencies in closed_loop.items():
        colour = TARGET_COLOURS.get(target)
        values = np.sort(np.asarray(latencies) * 1e3)
        p50, p99 = (float(np.percentile(values, q, method="inverted_cdf")) for q in (50, 99))
        label = f"{target}: p50 {p50:.1f}, p99 {p99:.1f} ms"
        axes.plot(values, np.arange(1, len(values) + 1) / len(values), color=colour, label=label)
        axes.plot([p50], [0.5], marker="o", color=colour, ls="none")
        axes.plot([p99], [0.99], marker="v", color=colour, ls="none")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(ScalarFormatter())
    axes.tick_params(axis="x", which="minor", labelsize=7)
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("fraction of requests")
    clients = payload["closed_loop"]["clients"]
    axes.set_title(
        f"Closed-loop latency CDF: {clients} clients, each sending its next request when the "
        f"last returns\n{title}",
        fontsize=9,
    )
    axes.grid(alpha=0.3, which="both")
    handles, _ = axes.get_legend_handles_labels()
    markers = [
        Line2D([], [], marker="o", color="black", ls="none", label="p50"),
        Line2D([], [], marker="v", color="black", ls="none", label="p99"),
    ]
    axes.legend(handles=[*handles, *markers], fontsize=8, loc="upper left")
    written.append(_save(figure, directory / "latency_cdf.png"))

    # Throughput by mode: coloured by kind, spread over repeats, the device-limited ideal.
    modes = payload["modes"]
    names = list(modes)
    figure, axes = plt.subplots(figsize=(10, 4.8))
    medians = [modes[n]["samples_per_s_median"] for n in names]
    runs = [modes[n]["samples_per_s_runs"] for n in names]
    spread = np.array(
        [[m - min(r) for m, r in zip(medians, runs, strict=True)],
         [max(r) - m for m, r in zip(medians, runs, strict=True)]]
    )  # fmt: skip
    bars = axes.barh(
        names,
        medians,
        xerr=spread,
        color=[KIND_COLOURS[modes[n]["kind"]] for n in names],
        error_kw={"elinewidth": 1, "capsize": 3},
    )
    for bar, name in zip(bars, names, strict=True):
        ratio = modes[name]["ratio_to_online_padded"]
        axes.text(
            bar.get_width() + spread[1][names.index(name)],
            bar.get_y() + bar.get_height() / 2,
            f" {modes[name]['samples_per_s_median']:.0f}  ({ratio:.2f}x)",
            va="center",
            fontsize=8,
        )
    ideal = payload["device_limited_ideal_samples_per_s"]
    axes.axvline(ideal, color="black", ls=":", lw=1)
    axes.invert_yaxis()
    axes.set_xlabel("samples/s: median, bars span min..max over repeats (ratio to online padded)")
    repeats = len(runs[0])
    axes.set_title(f"Throughput by mode, {repeats} interleaved repeats\n{title}", fontsize=9)
    axes.set_xlim(0, max(ideal, max(medians)) * 1.3)
    legend: list[Artist] = [Patch(color=c, label=kind) for kind, c in KIND_COLOURS.items()]
    legend.append(
        Line2D([], [], color="black", ls=":", label=f"device-limited ideal {ideal:.0f}/s")
    )
    axes.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    written.append(_save(figure, directory / "throughput_by_mode.png"))

    # Latency vs load: one colour per target, p50 solid, p99 dashed; capacity and knees marked.
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for number, (target, points) in enumerate(payload["open_loop_sweep"].items()):
        colour = TARGET_COLOURS.get(target)
        offered = [p["offered_rate"] for p in points]
        axes.plot(offered, [p["p50_ms"] for p in points], marker="o", color=colour, ls="-")
        axes.plot(offered, [p["p99_ms"] for p in points], marker="x", color=colour, ls="--")
        knee = payload["knees"].get(target)
        if knee is not None:
            axes.axvline(knee["samples_per_s"], color=colour, ls=":", lw=1)
            axes.annotate(
                f"knee {'' if knee['reached'] else 'above '}{knee['samples_per_s']:.0f}",
                (knee["samples_per_s"], 0.98 - 0.3 * number), xycoords=("data", "axes fraction"),
                rotation=90, va="top", ha="right", fontsize=7, color=colour,
            )  # fmt: skip
    capacity = payload["capacity_samples_per_s"]
    axes.axvline(capacity, color="black", lw=1)
    axes.annotate(
        f"lookahead capacity {capacity:.0f}", (capacity, 0.02), xycoords=("data", "axes fraction"),
        rotation=90, va="bottom", ha="right", fontsize=7,
    )  # fmt: skip
    axes.set_xlabel("offered load (samples/s, Poisson arrivals)")
    axes.set_ylabel("latency (ms, log scale)")
    axes.set_yscale("log")
    axes.set_title(f"Latency vs offered load\n{title}", fontsize=9)
    axes.grid(alpha=0.3, which="both")
    legend = [
        Line2D([], [], color=TARGET_COLOURS.get(t), label=t) for t in payload["open_loop_sweep"]
    ]
    legend += [
        Line2D([], [], color="black", ls="-", label="p50"),
        Line2D([], [], color="black", ls="--", label="p99"),
    ]
    axes.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    written.append(_save(figure, directory / "latency_vs_load.png"))
    return written


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
