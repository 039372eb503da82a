"""``packrunner bench``: PopRT's ``packed_bert_example.py``, complete and measured honestly.

One run: Original (padded), offline packing (attention mask; unpack/repack), online packing
(unpack/repack; attention mask first_fit, next_fit and our lookahead), the ``batched`` peer on
the same device, optionally shape-aware packing and the dynamic-shape peers (:mod:`.dynamic`:
FIFO pad-to-longest, length-sorted window, offline sorted oracle), PopRT's closed-loop latency
test, an open-loop (Poisson) sweep of offered load, and PopRT's MAE comparisons. Throughput
modes run ``repeats`` interleaved rounds; tables show medians and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from packrunner._version import __version__
from packrunner.bench.accuracy import compare_results
from packrunner.bench.compare import measure_online
from packrunner.bench.dataset import poprt_dataset, synthetic_dataset
from packrunner.bench.devices import DeviceSet
from packrunner.bench.dynamic import DynamicStrategy, plan_dynamic, run_dynamic
from packrunner.bench.latency import Target
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.packing import drain_queue
from packrunner.runner import PackRunner

__all__ = ["ModeResult", "all_mode_names", "knee_label", "run_bench"]

ModeKind = Literal["offline", "online", "peer", "dynamic"]

#: Online modes: the algorithm each runs (its model form follows from it).
ONLINE_MODES: dict[str, PackAlgorithm] = {
    "online_padded": PackAlgorithm.PADDED,
    "online_unpack_repack": PackAlgorithm.STREAM,
    "online_next_fit": PackAlgorithm.NEXT_FIT,
    "online_first_fit": PackAlgorithm.FIRST_FIT,
    "online_lookahead": PackAlgorithm.LOOKAHEAD,
}
#: Offline modes: the algorithm whose device checks and feeds each gets (its model form too).
OFFLINE_MODES: dict[str, PackAlgorithm] = {
    "original": PackAlgorithm.PADDED,
    "offline_attention_mask": PackAlgorithm.LOOKAHEAD,
    "offline_unpack_repack": PackAlgorithm.STREAM,
    # The batches online_lookahead forms when the whole dataset is queued, run offline: the
    # two differ only in how they run, so their ratio is the online path's own cost.
    "offline_same_plan": PackAlgorithm.LOOKAHEAD,
}
PEER = "peer_batched"
#: Shape-aware packing (``--dynamic-peers``): lookahead on the packed model with dynamic axes,
#: each batch's shape chosen by the calibrated cost model (:mod:`packrunner.shaping`).
SHAPE_AWARE = "online_shape_aware"
#: Dynamic-shape peers (``--dynamic-peers``): the padded model with dynamic axes.
DYNAMIC_MODES: dict[str, DynamicStrategy] = {
    "dynamic_fifo": DynamicStrategy.FIFO,
    "dynamic_sorted_window": DynamicStrategy.SORTED_WINDOW,
    "dynamic_sorted_oracle": DynamicStrategy.SORTED_ORACLE,
}
#: The packrunner row every ratio of the closing table is taken against.
PACKRUNNER = "online_lookahead"
# Option values recorded in results.json (the parsed namespace also holds parser objects).
_ARG_TYPES = (str, int, float, list, Path, type(None))
#: PopRT's comparisons, then ours (expected, actual).
COMPARISONS = (
    ("original", "online_unpack_repack"),
    ("offline_unpack_repack", "online_unpack_repack"),
    ("original", "online_first_fit"),
    ("original", "online_next_fit"),
    ("offline_attention_mask", "online_next_fit"),
    ("original", "online_lookahead"),
    ("offline_same_plan", "online_lookahead"),
    ("original", "offline_attention_mask"),
    ("original", "online_padded"),
    ("original", PEER),
    *(("original", name) for name in (SHAPE_AWARE, *DYNAMIC_MODES)),
)


@dataclass
class ModeResult:
    """Repeated measurements of one throughput mode."""

    name: str
    kind: ModeKind
    form: InputForm
    samples_per_s: list[float] = field(default_factory=list)
    samples_per_batch: float = 0.0
    device_busy_fraction: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    pack_us_per_sample: float | None = None
    results: list[dict[str, Any]] | None = None

    @property
    def median(self) -> float:
        """Median samples/s."""
        return statistics.median(self.samples_per_s)


def _config(args: argparse.Namespace, algorithm: PackAlgorithm) -> RunnerConfig:
    return RunnerConfig(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        timeout_us=args.timeout_us,
        max_valid_num=args.max_valid_num,
        algorithm=algorithm,
        dynamic_input_name=args.dynamic_input_name,
        vocab_size=args.emb_size,
    )


#: Modes every run keeps (ratios are taken against them).
REQUIRED_MODES = ("online_padded", PACKRUNNER)


def _modes(
    devices: DeviceSet, skip_peer: bool, dynamic_peers: bool, only: Sequence[str] | None = None
) -> dict[str, ModeResult]:
    """Every mode the device set can run, in running order (only ``only``'s and the required
    ones, when given)."""
    modes: dict[str, ModeResult] = {}
    tables: tuple[tuple[dict[str, PackAlgorithm], ModeKind], ...] = (
        (OFFLINE_MODES, "offline"),
        (ONLINE_MODES, "online"),
    )
    for table, kind in tables:
        for name, algorithm in table.items():
            if devices.supports(algorithm):
                modes[name] = ModeResult(name, kind, InputForm.for_algorithm(algorithm))
    if not skip_peer:
        modes[PEER] = ModeResult(PEER, "peer", InputForm.PADDED)
    if dynamic_peers:
        modes[SHAPE_AWARE] = ModeResult(SHAPE_AWARE, "online", InputForm.PACKED)
        for name in DYNAMIC_MODES:
            modes[name] = ModeResult(name, "dynamic", InputForm.PADDED)
    if only is not None:
        modes = {n: m for n, m in modes.items() if n in only or n in REQUIRED_MODES}
    return modes


def all_mode_names() -> list[str]:
    """Every throughput mode's name, in running order."""
    return [*OFFLINE_MODES, *ONLINE_MODES, PEER, SHAPE_AWARE, *DYNAMIC_MODES]


def run_bench(
    args: argparse.Namespace,
    devices: DeviceSet,
    echo: Callable[[str], None] = print,
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """Run everything; return the results payload (also written as JSON with ``command``).

    The human report goes through ``echo`` and a rich console on stdout unless ``args.json``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from packrunner.bench.latency import closed_loop, open_loop
    from packrunner.bench.offline import plan_dataset, run_offline
    from packrunner.bench.report import (
        POPRT_IPU_SAMPLES_PER_S,
        dump_results_csv,
        plot_all,
        write_json,
    )

    console = Console(quiet=args.quiet, stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    dataset_size = args.iterations * args.batch_size
    samples = synthetic_dataset(
        args.distribution,
        dataset_size,
        avg_seq_len=args.avg_seq_len,
        max_seq_len=args.seq_len,
        emb_size=devices.vocab_size(args.emb_size),
    )
    lengths = [len(s["input_ids"]) for s in samples]
    title = (
        f"{devices.name}, [{args.batch_size},{args.seq_len}], {dataset_size} samples "
        f"({args.distribution} lengths)"
    )
    if args.dynamic_peers:
        devices.make_dynamic()  # refuse a set without the models before anything runs
        devices.make_dynamic(InputForm.PACKED)
    modes = _modes(devices, args.skip_peer, args.dynamic_peers, args.modes)

    # --- throughput modes, interleaved rounds -------------------------------------------------
    plans = {
        name: plan_dataset(
            lengths,
            modes[name].form,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            max_valid_num=args.max_valid_num,
        )
        for name in modes
        if name in OFFLINE_MODES
    }
    if "offline_same_plan" in modes:
        lookahead = _config(args, PackAlgorithm.LOOKAHEAD)
        plans["offline_same_plan"] = drain_queue(
            lengths,
            algorithm=lookahead.algorithm,
            batch_size=lookahead.batch_size,
            seq_len=lookahead.seq_len,
            max_valid_num=lookahead.max_valid_num,
            lookahead=lookahead.lookahead,
        )
    dynamic_batches = {
        name: plan_dynamic(
            lengths, strategy, batch_size=args.batch_size, window=max(256, args.max_valid_num + 1)
        )
        for name, strategy in DYNAMIC_MODES.items()
        if name in modes
    }
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("throughput modes", total=args.repeats * len(modes))
        for round_number in range(args.repeats):
            keep = round_number == 0
            for name, mode in modes.items():
                progress.update(task, description=f"round {round_number + 1}: {name}")
                _quiesce()
                if mode.kind == "offline":
                    config = _config(args, OFFLINE_MODES[name])
                    device = devices.make(mode.form)
                    device.open()
                    try:
                        offline = run_offline(device, samples, plans[name], config)
                    finally:
                        device.close()
                    mode.samples_per_s.append(offline.samples_per_s)
                    mode.samples_per_batch = offline.mean_samples_per_batch
                    mode.device_busy_fraction.append(offline.device_busy_s / offline.wall_s)
                    mode.batch_ms.append(offline.device_busy_s / offline.batches * 1e3)
                    mode.pack_us_per_sample = offline.pack_s * 1e6 / offline.samples
                    if keep:
                        mode.results = offline.results
                elif mode.kind == "dynamic":
                    device = devices.make_dynamic()
                    device.open()
                    try:
                        dynamic = run_dynamic(
                            device,
                            samples,
                            dynamic_batches[name],
                            _config(args, PackAlgorithm.PADDED),
                        )
                    finally:
                        device.close()
                    mode.samples_per_s.append(dynamic.samples_per_s)
                    mode.samples_per_batch = dynamic.mean_samples_per_batch
                    mode.device_busy_fraction.append(dynamic.device_busy_s / dynamic.wall_s)
                    mode.batch_ms.append(dynamic.device_busy_s / dynamic.batches * 1e3)
                    if keep:
                        mode.results = dynamic.results
                elif mode.kind == "online":
                    shaped = name == SHAPE_AWARE
                    algorithm = PackAlgorithm.LOOKAHEAD if shaped else ONLINE_MODES[name]
                    online = measure_online(
                        partial(devices.make_dynamic, InputForm.PACKED)
                        if shaped
                        else partial(devices.for_algorithm, algorithm),
                        _config(args, algorithm),
                        samples,
                        keep_results=keep,
                        # Warm-up (untimed) calibrates the shape-aware planner's cost model.
                        warmup=shaped,
                    )
                    mode.samples_per_s.append(online.samples_per_s)
                    mode.samples_per_batch = online.mean_samples_per_batch
                    mode.device_busy_fraction.append(online.device_busy_s / online.wall_s)
                    mode.batch_ms.append(online.device_busy_s / online.batches * 1e3)
                    if keep:
                        mode.results = [dict(r) for r in online.results or ()]
                else:
                    rate, results = _run_peer(args, devices, samples)
                    mode.samples_per_s.append(rate)
                    mode.samples_per_batch = float(args.batch_size)
                    if keep:
                        mode.results = results
                progress.advance(task)

    padded_rate = modes["online_padded"].samples_per_s
    packrunner_rate = modes[PACKRUNNER].samples_per_s
    ratios = {
        name: statistics.median(m.samples_per_s[r] / padded_rate[r] for r in range(args.repeats))
        for name, m in modes.items()
    }
    # Median of per-round ratios: online lookahead over its own batches run offline.
    same_plan = None
    if "offline_same_plan" in modes and "online_lookahead" in modes:
        pairs = zip(
            modes["online_lookahead"].samples_per_s,
            modes["offline_same_plan"].samples_per_s,
            strict=True,
        )
        same_plan = statistics.median(online / offline for online, offline in pairs)
    # Each round measured side by side: packrunner's rate over the mode's, per round, median.
    packrunner_ratios = {
        name: statistics.median(
            packrunner_rate[r] / m.samples_per_s[r] for r in range(args.repeats)
        )
        for name, m in modes.items()
    }
    host: dict[str, float] | None = None
    if devices.backend == "sim":
        host_samples = poprt_dataset(max(dataset_size, 16_000), emb_size=args.emb_size)
        host_config = replace(
            _config(args, PackAlgorithm.LOOKAHEAD), max_queue_size=len(host_samples)
        )
        host_runs = [
            measure_online(
                lambda: devices.make(InputForm.PACKED, batch_latency_us=0),
                host_config,
                host_samples,
            ).samples_per_s
            for _ in range(args.repeats)
        ]
        host = {"samples_per_s": statistics.median(host_runs), "samples": len(host_samples)}

    # --- latency: PopRT's closed loop, and an open-loop sweep ---------------------------------
    clients = args.clients or int(args.batch_size * 3.5)
    per_client = args.requests_per_client or max(20, 4 * dataset_size // clients)
    latency_targets = [n for n in ("online_padded", "online_lookahead", PEER) if n in modes]
    if args.throughput_only:
        latency_targets = []
    closed: dict[str, Any] = {}
    closed_latencies: dict[str, npt.NDArray[np.float64]] = {}
    sweep: dict[str, list[dict[str, Any]]] = {}
    capacity = modes["online_lookahead"].median
    with Progress(*columns, console=console, transient=True) as progress:
        for name in latency_targets:
            task = progress.add_task(f"closed loop {name}", total=clients * per_client)

            def tick(task_id: Any = task) -> None:
                progress.advance(task_id)

            with _latency_target(name, args, devices) as target:
                _quiesce()
                summary, latencies = closed_loop(
                    target,
                    samples,
                    clients=clients,
                    requests_per_client=per_client,
                    on_request=tick,
                )
                closed[name] = summary.as_dict()
                closed_latencies[name] = latencies
                points = []
                for fraction in args.sweep:
                    rate = capacity * fraction
                    requests = max(50, int(rate * args.sweep_seconds))
                    sweep_task = progress.add_task(
                        f"open loop {name} @ {rate:.0f}/s", total=requests
                    )

                    def sweep_tick(task_id: Any = sweep_task) -> None:
                        progress.advance(task_id)

                    _quiesce()
                    point, _ = open_loop(
                        target, samples, rate=rate, requests=requests, on_request=sweep_tick
                    )
                    points.append(point.as_dict())
                sweep[name] = points

    # --- accuracy: PopRT's comparisons, plus ours ---------------------------------------------
    accuracy: dict[str, dict[str, Any]] = {}
    for expected_name, actual_name in COMPARISONS:
        if expected_name not in modes or actual_name not in modes:
            continue
        expected, actual = modes[expected_name].results, modes[actual_name].results
        assert expected is not None and actual is not None
        report = compare_results(expected, actual, lengths)
        accuracy[f"{expected_name} vs {actual_name}"] = {
            name: {
                "mean_mae": a.mean_mae,
                "max_abs_diff": a.max_abs_diff,
                "worst_samples": [list(w) for w in a.worst_samples],
            }
            for name, a in report.items()
        }

    if args.dump_results:
        for name, mode in modes.items():
            if mode.results:
                dump_results_csv(results_dir / f"{name}.csv", mode.results, sorted(mode.results[0]))

    # --- report -------------------------------------------------------------------------------
    nominal_ms = args.batch_latency_us / 1000 if devices.backend == "sim" else None
    token_limit = args.batch_size * args.seq_len / float(np.mean(lengths))
    padded_batch_ms = statistics.median(modes["online_padded"].batch_ms)
    # The most any packing could serve: the token limit per batch, at the device's batch time.
    ideal = token_limit / ((nominal_ms or padded_batch_ms) / 1e3)
    payload: dict[str, Any] = {
        "packrunner_version": __version__,
        "title": title,
        "command": command,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, _ARG_TYPES)},
        "distribution": args.distribution,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "models": {str(form): str(path) for form, path in devices.paths.items()},
        "modes": {
            name: {
                "kind": m.kind,
                "model": str(m.form),
                "samples_per_s_median": m.median,
                "samples_per_s_runs": m.samples_per_s,
                "ratio_to_online_padded": ratios[name],
                "packrunner_speedup": packrunner_ratios[name],
                "samples_per_batch": m.samples_per_batch,
                "device_busy_fraction": statistics.median(m.device_busy_fraction)
                if m.device_busy_fraction
                else None,
                "batch_ms_median": statistics.median(m.batch_ms) if m.batch_ms else None,
                "fraction_of_ideal": (
                    m.median / (m.samples_per_batch / (nominal_ms / 1e3)) if nominal_ms else None
                ),
                "pack_us_per_sample": m.pack_us_per_sample,
                "poprt_ipu_samples_per_s": POPRT_IPU_SAMPLES_PER_S.get(name),
            }
            for name, m in modes.items()
        },
        "device_limited_ideal_samples_per_s": ideal,
        "host_limit": host,
        "online_vs_offline_same_plan": same_plan,
        "closed_loop": {"clients": clients, "requests_per_client": per_client, "targets": closed},
        "open_loop_sweep": sweep,
        "capacity_samples_per_s": capacity,
        "knees": {name: _knee(points) for name, points in sweep.items()},
        "token_limit_samples_per_batch": token_limit,
        "accuracy": accuracy,
    }
    if not args.no_plots and not args.throughput_only:
        payload["plots"] = [str(p) for p in plot_all(results_dir, payload, closed_latencies)]
    write_json(results_dir / "results.json", payload)
    if not args.json:
        _print_report(payload, args, echo)
    return payload


def _quiesce() -> None:
    """Collect garbage, then freeze what survives: results kept from earlier modes must not
    make the cyclic GC walk them (tens of ms, every thread stopped) during a measurement."""
    gc.collect()
    gc.freeze()


def _knee(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The knee of the latency/load curve: the highest offered rate whose p99 latency is still
    within 3x the p99 at the lightest load (beyond it, queueing takes over).

    ``reached`` is False when even the highest offered rate stays within that bound: the knee
    is then somewhere above the sweep, and ``samples_per_s`` is only a lower bound.
    """
    if not points:
        return None
    ordered = sorted(points, key=lambda p: p["offered_rate"])
    bound = 3 * ordered[0]["p99_ms"]
    kept = [p["offered_rate"] for p in ordered if p["p99_ms"] <= bound]
    top = ordered[-1]["offered_rate"]
    if len(kept) == len(ordered):
        return {"samples_per_s": top, "reached": False}
    return {"samples_per_s": max(kept) if kept else ordered[0]["offered_rate"], "reached": True}


def knee_label(knee: dict[str, Any] | None) -> str:
    """``"1234 samples/s"``, or ``"above 1234 samples/s"`` when the sweep never reached it."""
    if knee is None:
        return "not measured"
    rate = f"{knee['samples_per_s']:.0f} samples/s"
    return rate if knee["reached"] else f"above {rate}"


@contextmanager
def _latency_target(name: str, args: argparse.Namespace, devices: DeviceSet) -> Iterator[Target]:
    """A started latency target (runner or peer), closed on exit."""
    if name == PEER:
        from packrunner.bench.peer import BatchedPeer

        device = devices.make(InputForm.PADDED)
        device.open()
        peer = BatchedPeer(
            device, _config(args, PackAlgorithm.PADDED), timeout_ms=args.timeout_us / 1000
        )
        try:
            yield peer
        finally:
            peer.close()
        return
    algorithm = ONLINE_MODES[name]
    with PackRunner(devices.for_algorithm(algorithm), _config(args, algorithm)) as runner:
        yield runner


def _run_peer(
    args: argparse.Namespace, devices: DeviceSet, samples: Sequence[dict[str, Any]]
) -> tuple[float, list[dict[str, Any]]]:
    from packrunner.bench.peer import BatchedPeer, run_all

    device = devices.make(InputForm.PADDED)
    device.open()
    peer = BatchedPeer(
        device, _config(args, PackAlgorithm.PADDED), timeout_ms=args.timeout_us / 1000
    )
    try:
        started = time.perf_counter()
        results = run_all(peer, samples)
        wall = time.perf_counter() - started
    finally:
        peer.close()
    return len(samples) / wall, results


def _print_report(
    payload: dict[str, Any], args: argparse.Namespace, echo: Callable[[str], None]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    table = Table(title=f"Throughput: {payload['title']} (median of {args.repeats} rounds)")
    for column in (
        "mode",
        "samples/s",
        "vs online padded",
        "packrunner speed-up",
        "samples/batch",
        "device busy",
        "ms/batch",
        "PopRT IPU (context)",
    ):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for name, m in payload["modes"].items():
        table.add_row(
            name,
            f"{m['samples_per_s_median']:.1f}",
            f"{m['ratio_to_online_padded']:.2f}x",
            f"{m['packrunner_speedup']:.2f}x",
            f"{m['samples_per_batch']:.2f}",
            f"{m['device_busy_fraction']:.0%}" if m["device_busy_fraction"] is not None else "-",
            f"{m['batch_ms_median']:.1f}" if m["batch_ms_median"] is not None else "-",
            f"{m['poprt_ipu_samples_per_s']:.0f}" if m["poprt_ipu_samples_per_s"] else "-",
        )
    console.print(table)
    modes = payload["modes"]
    if "offline_attention_mask" in modes:
        offline = modes["offline_attention_mask"]["samples_per_batch"]
        across_rows = modes.get("offline_unpack_repack", {}).get("samples_per_batch")
        echo(
            f"Offline attention-mask packing: {offline:.2f} samples per batch, token limit "
            f"{payload['token_limit_samples_per_batch']:.2f}"
            + (f" (offline unpack/repack {across_rows:.2f})." if across_rows else ".")
        )
    if modes["online_lookahead"]["fraction_of_ideal"] is not None:
        echo(
            "Online lookahead achieves "
            f"{modes['online_lookahead']['fraction_of_ideal']:.1%} of the device-limited ideal "
            "(its samples per batch / the nominal batch latency)."
        )
    if payload["online_vs_offline_same_plan"] is not None:
        echo(
            "Online lookahead vs the same batches run offline: "
            f"{payload['online_vs_offline_same_plan']:.3f}x."
        )
    if payload["host_limit"]:
        echo(
            f"Host limit (zero-latency device, lookahead, execute_async): "
            f"{payload['host_limit']['samples_per_s']:.0f} samples/s."
        )
    if "peer_batched" in modes:
        ours = modes["online_lookahead"]["samples_per_s_median"]
        peer = modes["peer_batched"]["samples_per_s_median"]
        echo(
            "packrunner lookahead vs batched (same device, padded rows): "
            f"{ours / peer:.2f}x throughput."
        )

    if args.throughput_only:
        _print_accuracy(payload, args, echo)
        return
    latency = Table(
        title=f"Closed loop (PopRT's): {payload['closed_loop']['clients']} client threads"
    )
    for column in ("target", "samples/s", "avg ms", "p50", "p90", "p99", "p99.9", "max", "errors"):
        latency.add_column(column, justify="right" if column != "target" else "left")
    for name, s in payload["closed_loop"]["targets"].items():
        latency.add_row(
            name,
            f"{s['throughput']:.1f}",
            *(f"{s[k]:.2f}" for k in ("avg_ms", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")),
            str(s["errors"]),
        )
    console.print(latency)

    sweep = Table(title="Open loop (Poisson arrivals through execute_async)")
    for column in ("target", "offered/s", "served/s", "p50 ms", "p90", "p99", "p99.9", "max"):
        sweep.add_column(column, justify="right" if column != "target" else "left")
    for name, points in payload["open_loop_sweep"].items():
        for p in points:
            sweep.add_row(
                name,
                f"{p['offered_rate']:.0f}",
                f"{p['throughput']:.0f}",
                *(f"{p[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")),
            )
    console.print(sweep)
    for name, knee in payload["knees"].items():
        echo(f"knee of {name}: {knee_label(knee)}")
    _print_accuracy(payload, args, echo)


def _print_accuracy(
    payload: dict[str, Any], args: argparse.Namespace, echo: Callable[[str], None]
) -> None:
    for comparison, outputs in payload["accuracy"].items():
        echo(f"\nCompare results between {comparison}")
        for output, a in outputs.items():
            echo(f"{output} average mae: {a['mean_mae']}  (max abs diff {a['max_abs_diff']:.3e})")
            if args.enable_debug:
                for index, mae in a["worst_samples"]:
                    echo(f"Sample: {index}, {output} mae : {mae}")
    if payload.get("plots"):
        echo("\nplots: " + ", ".join(payload["plots"]))
    echo(f"results: {Path(args.results_dir) / 'results.json'}")
