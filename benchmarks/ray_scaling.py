"""Scale-out on Ray Serve, measured side by side: ``python -m benchmarks.ray_scaling``.

A local Ray instance (loopback, no dashboard) serves ``packrunner.integrations.ray`` on
SimulatedDevice (it sleeps ``--batch-latency-us`` per batch, PopRT's IPU time by default, so
replicas scale even on a 2-core host). For 1, 2 and 4 runner replicas, the same open-loop load
generator as ``benchmarks.serving`` (aiohttp, OIP REST with binary tensors, one PopRT-length
sequence per request) drives the HTTP ingress through Ray's proxy:

1. throughput with every request offered at once (saturation), and its ratio to 1 replica;
2. packing per replica: samples per batch, read from each replica's Ray metrics
   (``ray_packrunner_replica_batch_samples``), against a single in-process runner offered the
   same load per replica (its share of the requests, all at once);
3. the front end's own ceiling: 1 replica on a zero-latency SimulatedDevice, i.e. what the
   proxy, the ingress and the load generator can carry on this host.

On a shared host the numbers include other tenants' noise; re-run on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from ray import serve

from benchmarks.serving import HttpV2
from packrunner import PackRunner
from packrunner.bench.dataset import poprt_dataset
from packrunner.bench.latency import LatencySummary, open_loop
from packrunner.integrations.ray import APP_NAME, build_application
from packrunner.serve import ServeSettings, load_model

#: Ray pushes metrics to its exporter this often (ms); read them after twice that.
METRICS_INTERVAL_MS = 500
FLOOD = 1e6  # an offered rate far above capacity: every request at once
_BATCH_SERIES = re.compile(
    r'^ray_packrunner_replica_batch_samples_(sum|count)\{.*replica="([^"]+)".*\} (\S+)$', re.M
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _replica_batches(metrics_port: int) -> dict[str, tuple[float, float]]:
    """(samples, batches) so far per replica, from Ray's metrics export."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {}
    for kind, replica, value in _BATCH_SERIES.findall(text):
        found.setdefault(replica, {})[kind] = float(value)
    return {r: (v.get("sum", 0.0), v.get("count", 0.0)) for r, v in found.items()}


def _settle() -> None:
    # Benchmark only: Ray exports metrics on a timer, with no way to ask for a flush.
    time.sleep(3 * METRICS_INTERVAL_MS / 1000)


def _drive(address: str, samples: Sequence[dict[str, Any]], rate: float) -> LatencySummary:
    target = HttpV2(address)
    summary, _ = open_loop(target, samples, rate=rate, requests=len(samples), finish=target.aclose)
    return summary


def _in_process_samples_per_batch(
    settings: ServeSettings, samples: Sequence[dict[str, Any]], rate: float
) -> float:
    model = load_model(settings)
    with PackRunner(model.device, model.config) as runner:
        open_loop(runner, samples, rate=rate, requests=len(samples))
        return runner.stats().mean_samples_per_batch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--requests-per-replica", type=int, default=1500, help="requests per run, per replica"
    )
    parser.add_argument("--batch-latency-us", type=int, default=8600)
    parser.add_argument("--ingress-replicas", type=int, default=1)
    args = parser.parse_args(argv)
    settings = ServeSettings(
        device="sim",
        sim_batch_latency_us=args.batch_latency_us,
        max_client_batch_size=1,
        max_concurrent_requests=8192,
    )
    dataset = [
        {"input_ids": s["input_ids"]}
        for s in poprt_dataset(args.requests_per_replica * max(args.replicas))
    ]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    metrics_port, http_port = _free_port(), _free_port()
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS},
    )
    address = f"127.0.0.1:{http_port}"
    rows: list[tuple[int, LatencySummary, float]] = []
    # The same offered load per replica as each served run: its share of the requests, all at
    # once, on one in-process runner.
    local_spb = _in_process_samples_per_batch(settings, dataset[: args.requests_per_replica], FLOOD)
    print(f"in-process runner: {local_spb:.2f} samples/batch", flush=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})

        def deploy(served: ServeSettings, replicas: int) -> None:
            application = build_application(
                served,
                replicas=replicas,
                replica_num_cpus=0,
                ingress_replicas=args.ingress_replicas,
                ingress_num_cpus=0,
            )
            serve.run(application, name=APP_NAME, route_prefix="/")

        for replicas in args.replicas:
            deploy(settings, replicas)
            load = dataset[: args.requests_per_replica * replicas]
            _drive(address, load[:200], FLOOD)  # connections, warm-up
            _settle()
            before = _replica_batches(metrics_port)
            summary = _drive(address, load, FLOOD)
            _settle()
            after = _replica_batches(metrics_port)
            per_replica = []
            for replica, (total, batches) in after.items():
                old_total, old_batches = before.get(replica, (0.0, 0.0))
                if batches > old_batches:
                    per_replica.append((total - old_total) / (batches - old_batches))
            served_spb = sum(per_replica) / len(per_replica)
            rows.append((replicas, summary, served_spb))
            print(
                f"{replicas} replicas: {summary.throughput:.1f} req/s, {served_spb:.2f} "
                f"samples/batch per replica, {summary.errors} errors",
                flush=True,
            )
        deploy(replace(settings, sim_batch_latency_us=0), 1)
        _drive(address, dataset[:200], FLOOD)
        ceiling = _drive(address, dataset[: args.requests_per_replica * 2], FLOOD)
    finally:
        serve.shutdown()
        ray.shutdown()

    base = rows[0][1].throughput
    print(
        f"\nSimulatedDevice {args.batch_latency_us} us/batch, [16,256], max_valid_num 40; "
        f"OIP HTTP binary through Ray's proxy, {args.ingress_replicas} ingress replica(s)\n"
    )
    print("| replicas | req/s | vs 1 | p50 ms | p99 ms | samples/batch per replica | "
          "in-process, same load | diff | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for replicas, summary, served_spb in rows:
        print(
            f"| {replicas} | {summary.throughput:.1f} | {summary.throughput / base:.2f}x | "
            f"{summary.p50_ms:.1f} | {summary.p99_ms:.1f} | {served_spb:.2f} | "
            f"{local_spb:.2f} | {100 * (served_spb / local_spb - 1):+.1f}% | {summary.errors} |"
        )
    print(
        f"\nfront-end ceiling (1 replica, zero-latency device): {ceiling.throughput:.1f} req/s, "
        f"{ceiling.errors} errors"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
