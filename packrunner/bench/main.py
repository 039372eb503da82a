"""``packrunner bench``: PopRT's ``packed_bert_example.py``, complete and measured honestly.

One run: Original (padded), offline packing (attention mask; unpack/repack), online packing
(unpack/repack; attention mask first_fit, next_fit and our lookahead), the ``batched`` peer on
the same device, PopRT's closed-loop latency test, an open-loop (Poisson) sweep of offered
load, and PopRT's MAE comparisons. Throughput modes run ``--repeats`` interleaved rounds;
tables show medians and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner._version import __version__
from packrunner.bench.accuracy import compare_results
from packrunner.bench.compare import poprt_dataset
from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.devices.simulated import POPRT_IPU_BATCH_LATENCY_US, SimulatedDevice
from packrunner.runner import PackRunner

__all__ = ["build_parser", "main", "run_bench"]

OUTPUTS = ("end_logits", "start_logits")  # PopRT's OUTPUT1, OUTPUT2 order in its CSVs


@dataclass
class ModeResult:
    """Repeated measurements of one throughput mode."""

    name: str
    model: str
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


def build_parser() -> argparse.ArgumentParser:
    """Flags of PopRT's example (same names and defaults) plus ours."""
    parser = argparse.ArgumentParser(prog="packrunner bench", description=__doc__)
    seed = parser.add_argument_group("PopRT's flags")
    seed.add_argument("--avg_seq_len", type=int, default=128, help="average sequence length")
    seed.add_argument("--batch_size", type=int, default=16, help="batch size of model")
    seed.add_argument("--dump_results", action="store_true", help="dump results (CSV per mode)")
    seed.add_argument("--dynamic_input_name", default="input_ids", help="dynamic input name")
    seed.add_argument("--emb_size", type=int, default=30522, help="word embedding table size")
    seed.add_argument("--enable_debug", action="store_true", help="print the top-10 MAE samples")
    seed.add_argument("--iterations", type=int, default=100, help="number of batches to run")
    seed.add_argument("--max_seq_len", type=int, default=256, help="max sequence length")
    seed.add_argument("--max_valid_num", type=int, default=40, help="max valid num for pack")
    seed.add_argument(
        "--timeout_microseconds", type=int, default=15_000, help="timeout in microseconds"
    )
    ours = parser.add_argument_group("packrunner's flags")
    ours.add_argument("--device", choices=("sim", "onnx"), default="sim")
    ours.add_argument("--model", help="packed (segment-id mask) ONNX model; default: ours")
    ours.add_argument("--padded_model", "--padded-model", help="padded twin ONNX model")
    ours.add_argument("--unpack_repack_model", "--unpack-repack-model", help="unpack/repack model")
    ours.add_argument("--batch_latency_us", type=int, default=POPRT_IPU_BATCH_LATENCY_US)
    ours.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    ours.add_argument("--repeats", type=int, default=3, help="interleaved rounds per mode")
    ours.add_argument("--clients", type=int, default=None, help="closed loop: default 3.5 x batch")
    ours.add_argument(
        "--requests_per_client", type=int, default=None, help="closed loop requests per client"
    )
    ours.add_argument(
        "--sweep", default="0.3,0.6,0.8,0.9,1.0,1.1", help="open-loop rates, x packed capacity"
    )
    ours.add_argument("--sweep_seconds", type=float, default=2.0, help="duration of each rate")
    ours.add_argument("--skip_peer", action="store_true", help="do not run the batched peer")
    ours.add_argument("--no_plots", action="store_true")
    ours.add_argument("--results_dir", default="results", help="where JSON, CSV and PNGs go")
    ours.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


class _Devices:
    """Device factories for each model kind, for the chosen backend."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths: dict[str, str] = {}
        if args.device == "onnx":
            from packrunner.models import default_model_path

            shape = {
                "batch_size": args.batch_size,
                "seq_len": args.max_seq_len,
                "max_valid_num": args.max_valid_num,
            }
            self.paths = {
                "padded": str(args.padded_model or default_model_path("padded", **shape)),
                "packed": str(args.model or default_model_path("packed", **shape)),
                "unpack_repack": str(
                    args.unpack_repack_model or default_model_path("unpack_repack", **shape)
                ),
            }

    def make(self, kind: str, *, latency_us: int | None = None) -> Device:
        args = self.args
        if args.device == "sim":
            return SimulatedDevice(
                batch_size=args.batch_size,
                seq_len=args.max_seq_len,
                batch_latency_us=args.batch_latency_us if latency_us is None else latency_us,
                mode="unpack_repack" if kind == "unpack_repack" else "attention_mask",
                max_valid_num=args.max_valid_num,
            )
        from packrunner.devices.onnx import OnnxDevice

        return OnnxDevice(self.paths[kind], intra_op_num_threads=args.threads)

    def describe(self) -> str:
        if self.args.device == "sim":
            return f"SimulatedDevice {self.args.batch_latency_us / 1000:.1f} ms/batch"
        name = "default BERT 2x128" if self.args.model is None else Path(self.args.model).name
        return f"onnxruntime CPU ({os.cpu_count()} cores), {name}"


ONLINE_MODES: dict[str, tuple[str, PackAlgorithm]] = {
    "online_padded": ("padded", PackAlgorithm.PADDED),
    "online_unpack_repack": ("unpack_repack", PackAlgorithm.STREAM),
    "online_next_fit": ("packed", PackAlgorithm.NEXT_FIT),
    "online_first_fit": ("packed", PackAlgorithm.FIRST_FIT),
    "online_lookahead": ("packed", PackAlgorithm.LOOKAHEAD),
}
OFFLINE_MODES: dict[str, str] = {
    "original": "padded",
    "offline_attention_mask": "packed",
    "offline_unpack_repack": "unpack_repack",
}
# The runner algorithm whose device checks and feeds each model kind gets.
OFFLINE_ALGORITHMS: dict[str, PackAlgorithm] = {
    "padded": PackAlgorithm.PADDED,
    "packed": PackAlgorithm.LOOKAHEAD,
    "unpack_repack": PackAlgorithm.STREAM,
}


def _config(args: argparse.Namespace, algorithm: PackAlgorithm) -> RunnerConfig:
    return RunnerConfig(
        batch_size=args.batch_size,
        seq_len=args.max_seq_len,
        timeout_us=args.timeout_microseconds,
        max_valid_num=args.max_valid_num,
        algorithm=algorithm,
        dynamic_input_name=args.dynamic_input_name,
        vocab_size=args.emb_size,
    )


def _run_online(
    device: Device, config: RunnerConfig, samples: Sequence[dict[str, Any]], keep: bool
) -> tuple[float, float, float, float, list[dict[str, Any]] | None]:
    async def go() -> tuple[float, float, float, float, list[dict[str, Any]] | None]:
        async with PackRunner(device, config) as runner:
            started = time.perf_counter()
            results = await asyncio.gather(*(runner.execute_async(s) for s in samples))
            wall = time.perf_counter() - started
            stats = runner.stats()
        busy_per_batch = stats.device_busy_s / stats.batches
        return (
            len(samples) / wall,
            stats.mean_samples_per_batch,
            stats.device_busy_s / wall,
            busy_per_batch * 1e3,
            list(results) if keep else None,
        )

    return asyncio.run(go())


def run_bench(
    args: argparse.Namespace, echo: Callable[[str], None] = print, *, command: str | None = None
) -> dict[str, Any]:
    """Run everything; return the results payload (also written as JSON with ``command``)."""
    from rich.console import Console
    from rich.progress import Progress

    from packrunner.bench.latency import closed_loop, open_loop
    from packrunner.bench.offline import plan_dataset, run_offline
    from packrunner.bench.report import (
        POPRT_IPU_SAMPLES_PER_S,
        dump_results_csv,
        plot_all,
        write_json,
    )

    console = Console(quiet=args.quiet, stderr=True)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    devices = _Devices(args)
    dataset_size = args.iterations * args.batch_size
    samples = poprt_dataset(
        dataset_size,
        avg_seq_len=args.avg_seq_len,
        max_seq_len=args.max_seq_len,
        emb_size=args.emb_size,
    )
    lengths = [len(s["input_ids"]) for s in samples]
    title = f"{devices.describe()}, [{args.batch_size},{args.max_seq_len}], {dataset_size} samples"
    modes: dict[str, ModeResult] = {}

    # --- throughput modes, interleaved rounds -------------------------------------------------
    plans = {
        name: plan_dataset(
            lengths,
            kind,
            batch_size=args.batch_size,
            seq_len=args.max_seq_len,
            max_valid_num=args.max_valid_num,
        )
        for name, kind in OFFLINE_MODES.items()
    }
    names = [*OFFLINE_MODES, *ONLINE_MODES] + ([] if args.skip_peer else ["peer_batched"])
    for name in names:
        kind = OFFLINE_MODES.get(name) or ONLINE_MODES.get(name, ("padded", None))[0]
        modes[name] = ModeResult(name, kind)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("throughput modes", total=args.repeats * len(names))
        for round_number in range(args.repeats):
            keep = round_number == 0
            for name in names:
                mode = modes[name]
                progress.update(task, description=f"round {round_number + 1}: {name}")
                _quiesce()
                if name in OFFLINE_MODES:
                    device = devices.make(OFFLINE_MODES[name])
                    device.open()
                    try:
                        run = run_offline(
                            device,
                            samples,
                            plans[name],
                            _config(args, OFFLINE_ALGORITHMS[OFFLINE_MODES[name]]),
                        )
                    finally:
                        device.close()
                    mode.samples_per_s.append(run.samples_per_s)
                    mode.samples_per_batch = run.mean_samples_per_batch
                    mode.device_busy_fraction.append(run.device_busy_s / run.wall_s)
                    mode.batch_ms.append(run.device_busy_s / run.batches * 1e3)
                    mode.pack_us_per_sample = run.pack_s * 1e6 / run.samples
                    if keep:
                        mode.results = run.results
                elif name in ONLINE_MODES:
                    kind, algorithm = ONLINE_MODES[name]
                    rate, spb, busy, batch_ms, results = _run_online(
                        devices.make(kind), _config(args, algorithm), samples, keep
                    )
                    mode.samples_per_s.append(rate)
                    mode.samples_per_batch = spb
                    mode.device_busy_fraction.append(busy)
                    mode.batch_ms.append(batch_ms)
                    if keep:
                        mode.results = results
                else:
                    rate, results = _run_peer(args, devices, samples, keep)
                    mode.samples_per_s.append(rate)
                    mode.samples_per_batch = float(args.batch_size)
                    if keep:
                        mode.results = results
                progress.advance(task)

    padded_rate = {r: modes["online_padded"].samples_per_s[r] for r in range(args.repeats)}
    ratios = {
        name: statistics.median(m.samples_per_s[r] / padded_rate[r] for r in range(args.repeats))
        for name, m in modes.items()
    }
    host: dict[str, float] | None = None
    if args.device == "sim":
        host_samples = poprt_dataset(max(dataset_size, 16_000), emb_size=args.emb_size)
        host_runs = [
            _run_online(
                devices.make("packed", latency_us=0),
                replace(_config(args, PackAlgorithm.LOOKAHEAD), max_queue_size=len(host_samples)),
                host_samples,
                False,
            )[0]
            for _ in range(args.repeats)
        ]
        host = {"samples_per_s": statistics.median(host_runs), "samples": len(host_samples)}

    # --- latency: PopRT's closed loop, and an open-loop sweep -------------------------------
    clients = args.clients or int(args.batch_size * 3.5)
    per_client = args.requests_per_client or max(20, 4 * dataset_size // clients)
    latency_targets = ["online_padded", "online_lookahead"] + (
        [] if args.skip_peer else ["peer_batched"]
    )
    closed: dict[str, Any] = {}
    closed_latencies: dict[str, npt.NDArray[np.float64]] = {}
    sweep: dict[str, list[dict[str, Any]]] = {}
    capacity = modes["online_lookahead"].median
    fractions = [float(x) for x in args.sweep.split(",") if x]
    with Progress(console=console, transient=True) as progress:
        for name in latency_targets:
            task = progress.add_task(f"closed loop {name}", total=clients * per_client)

            def tick(task_id: Any = task) -> None:
                progress.advance(task_id)

            with _LatencyTarget(name, args, devices) as target:
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
                for fraction in fractions:
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

    # --- accuracy: PopRT's comparisons, plus ours ------------------------------------------
    comparisons = [
        ("original", "online_unpack_repack"),
        ("offline_unpack_repack", "online_unpack_repack"),
        ("original", "online_first_fit"),
        ("original", "online_next_fit"),
        ("offline_attention_mask", "online_next_fit"),
        ("original", "online_lookahead"),
        ("original", "offline_attention_mask"),
        ("original", "online_padded"),
    ] + ([] if args.skip_peer else [("original", "peer_batched")])
    accuracy: dict[str, dict[str, Any]] = {}
    for expected_name, actual_name in comparisons:
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
            if mode.results is not None:
                dump_results_csv(results_dir / f"{name}.csv", mode.results, OUTPUTS)

    # --- report -------------------------------------------------------------------------------
    knees = {name: _knee(points) for name, points in sweep.items()}
    nominal_ms = args.batch_latency_us / 1000 if args.device == "sim" else None
    payload: dict[str, Any] = {
        "packrunner_version": __version__,
        "title": title,
        "command": command,
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "models": devices.paths,
        "modes": {
            name: {
                "model": m.model,
                "samples_per_s_median": m.median,
                "samples_per_s_runs": m.samples_per_s,
                "ratio_to_online_padded": ratios[name],
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
        "host_limit": host,
        "closed_loop": {"clients": clients, "requests_per_client": per_client, **closed},
        "open_loop_sweep": sweep,
        "knee_samples_per_s": knees,
        "token_limit_samples_per_batch": args.batch_size
        * args.max_seq_len
        / float(np.mean(lengths)),
        "accuracy": accuracy,
    }
    if not args.no_plots:
        throughput = {name: m.median for name, m in modes.items()}
        payload["plots"] = [
            str(p)
            for p in plot_all(
                results_dir,
                throughput=throughput,
                ratios=ratios,
                closed_loop=closed_latencies,
                sweep=sweep,
                title=title,
            )
        ]
    write_json(results_dir / "results.json", payload)
    _print_report(payload, args, echo)
    return payload


def _quiesce() -> None:
    """Collect garbage, then freeze what survives: results kept from earlier modes must not
    make the cyclic GC walk them (tens of ms, every thread stopped) during a measurement."""
    gc.collect()
    gc.freeze()


def _knee(points: Sequence[dict[str, Any]]) -> float | None:
    """The knee of the latency/load curve: the highest offered rate whose p99 latency is still
    within 3x the p99 at the lightest load (beyond it, queueing takes over)."""
    if not points:
        return None
    ordered = sorted(points, key=lambda p: p["offered_rate"])
    bound = 3 * ordered[0]["p99_ms"]
    kept = [p["offered_rate"] for p in ordered if p["p99_ms"] <= bound]
    return max(kept) if kept else None


class _LatencyTarget:
    """Context manager giving a started latency target (runner or peer) and closing it after."""

    def __init__(self, name: str, args: argparse.Namespace, devices: _Devices) -> None:
        self.name, self.args, self.devices = name, args, devices
        self._close: Callable[[], None] = lambda: None

    def __enter__(self) -> Any:
        if self.name == "peer_batched":
            from packrunner.bench.peer import BatchedPeer

            device = self.devices.make("padded")
            device.open()
            peer = BatchedPeer(
                device,
                _config(self.args, PackAlgorithm.PADDED),
                timeout_ms=self.args.timeout_microseconds / 1000,
            )
            self._close = peer.close
            return peer
        kind, algorithm = ONLINE_MODES[self.name]
        runner = PackRunner(self.devices.make(kind), _config(self.args, algorithm)).start()
        self._close = runner.close
        return runner

    def __exit__(self, *exc: object) -> None:
        self._close()


def _run_peer(
    args: argparse.Namespace, devices: _Devices, samples: Sequence[dict[str, Any]], keep: bool
) -> tuple[float, list[dict[str, Any]] | None]:
    from packrunner.bench.peer import BatchedPeer, run_all

    device = devices.make("padded")
    device.open()
    peer = BatchedPeer(
        device, _config(args, PackAlgorithm.PADDED), timeout_ms=args.timeout_microseconds / 1000
    )
    try:
        started = time.perf_counter()
        results = run_all(peer, samples)
        wall = time.perf_counter() - started
    finally:
        peer.close()
    return len(samples) / wall, results if keep else None


def _print_report(
    payload: dict[str, Any], args: argparse.Namespace, echo: Callable[[str], None]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    table = Table(title=f"Throughput: {payload['title']} (median of {args.repeats} rounds)")
    for column in (
        "mode",
        "samples/s",
        "vs online padded",
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
            f"{m['samples_per_batch']:.2f}",
            f"{m['device_busy_fraction']:.0%}" if m["device_busy_fraction"] is not None else "-",
            f"{m['batch_ms_median']:.1f}" if m["batch_ms_median"] is not None else "-",
            f"{m['poprt_ipu_samples_per_s']:.0f}" if m["poprt_ipu_samples_per_s"] else "-",
        )
    console.print(table)
    modes = payload["modes"]
    offline = modes["offline_attention_mask"]["samples_per_batch"]
    echo(
        f"Offline attention-mask packing: {offline:.2f} samples per batch, token limit "
        f"{payload['token_limit_samples_per_batch']:.2f} "
        f"(offline unpack/repack {modes['offline_unpack_repack']['samples_per_batch']:.2f})."
    )
    if modes["online_lookahead"]["fraction_of_ideal"] is not None:
        echo(
            "Online lookahead achieves "
            f"{modes['online_lookahead']['fraction_of_ideal']:.1%} of the device-limited ideal "
            "(samples per batch / nominal batch latency)."
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

    latency = Table(
        title=f"Closed loop (PopRT's): {payload['closed_loop']['clients']} client threads"
    )
    for column in ("target", "samples/s", "avg ms", "p50", "p90", "p99", "p99.9", "max", "errors"):
        latency.add_column(column, justify="right" if column != "target" else "left")
    for name, s in payload["closed_loop"].items():
        if not isinstance(s, dict):
            continue
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
    for name, knee in payload["knee_samples_per_s"].items():
        echo(f"knee of {name}: {knee:.0f} samples/s" if knee else f"knee of {name}: not reached")

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``packrunner bench`` and ``python -m benchmarks.packed_bert``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    run_bench(args, command=" ".join(["packrunner", "bench", *arguments]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
