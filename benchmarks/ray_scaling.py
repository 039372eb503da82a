"""Scale-out on Ray Serve, measured side by side: ``python -m benchmarks.ray_scaling``.

A local Ray instance (loopback, no dashboard) serves ``packrunner.integrations.ray`` on
SimulatedDevice (it sleeps ``--batch-latency-us`` per batch, PopRT's IPU time by default, so
replicas scale even on a 2-core host). For 1, 2 and 4 runner replicas, the same open-loop load
generator as ``benchmarks.serving`` (aiohttp, OIP REST with binary tensors, one PopRT-length
sequence per request) drives the HTTP ingress through Ray's proxy:

1. throughput with every request offered at once (saturation: as many in flight as the
   replicas' ``max_ongoing_requests`` allow), and its ratio to 1 replica;
2. packing per replica: samples per batch, read from each replica's Ray metrics
   (``ray_packrunner_replica_batch_samples``), against a single in-process runner offered the
   same load per replica (its share of the requests, all at once);
3. the front end's own ceiling: 1 replica on a zero-latency SimulatedDevice, i.e. what the
   proxy, the ingress and the load generator can carry on this host.

On a shared host the numbers include other tenants' noise; re-run on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
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
from packrunner.integrations.ray import APP_NAME, build_application, replica_limits
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


def _drive(address: str, samples: Sequence[dict[str, Any]], connections: int) -> LatencySummary:
    """Every request offered at once, at most ``connections`` of them in flight."""
    target = HttpV2(address, connections)
    summary, _ = open_loop(target, samples, rate=FLOOD, requests=len(samples), finish=target.aclose)
    return summary


def _client_cpu(
    address: str, samples: Sequence[dict[str, Any]], connections: int
) -> tuple[LatencySummary, float]:
    """A saturating run, and the load generator's CPU use in cores (CPU seconds / wall)."""
    cpu, wall = time.process_time(), time.monotonic()
    summary = _drive(address, samples, connections)
    return summary, (time.process_time() - cpu) / (time.monotonic() - wall)


class _AtMost:
    """A runner driven with at most ``limit`` requests in flight, as a replica is by Ray."""

    def __init__(self, runner: PackRunner, limit: int) -> None:
        self._runner = runner
        self._limit = limit
        self._slots: asyncio.Semaphore | None = None

    async def execute_async(self, sample: dict[str, Any]) -> Any:
        if self._slots is None:  # on the load generator's loop
            self._slots = asyncio.Semaphore(self._limit)
        async with self._slots:
            return await self._runner.execute_async(sample)

    def execute(self, sample: Any) -> Any:
        raise NotImplementedError("open loop only")


def _in_process_samples_per_batch(
    settings: ServeSettings, samples: Sequence[dict[str, Any]], in_flight: int
) -> float:
    model = load_model(settings)
    with PackRunner(model.device, model.config) as runner:
        open_loop(_AtMost(runner, in_flight), samples, rate=FLOOD, requests=len(samples))
        return runner.stats().mean_samples_per_batch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--requests-per-replica", type=int, default=1500, help="requests per run, per replica"
    )
    parser.add_argument("--batch-latency-us", type=int, default=8600)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per packed batch")
    parser.add_argument("--max-valid-num", type=int, default=40, help="samples per batch")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    args = parser.parse_args(argv)
    settings = ServeSettings(
        device="sim",
        sim_batch_latency_us=args.batch_latency_us,
        max_client_batch_size=1,
        max_concurrent_requests=8192,
        batch_size=args.batch_size,
        max_valid_num=args.max_valid_num,
    )
    dataset = [
        {"input_ids": s["input_ids"]}
        for s in poprt_dataset(args.requests_per_replica * max(args.replicas))
    ]
    limits = replica_limits(load_model(settings).config)
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
    rows: list[tuple[int, LatencySummary, float, float]] = []
    # The same offered load per replica as each served run: its share of the requests, all at
    # once, as many in flight as Ray lets reach a replica, on one in-process runner.
    local_spb = _in_process_samples_per_batch(
        settings, dataset[: args.requests_per_replica], limits.max_ongoing_requests
    )
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
            # Enough in flight to fill every replica's max_ongoing_requests (four batches
            # each), never so many that Ray's per-caller queue answers 429.
            connections = replicas * limits.max_ongoing_requests
            _drive(address, load[:200], connections)  # connections, warm-up
            _settle()
            before = _replica_batches(metrics_port)
            summary, client_cores = _client_cpu(address, load, connections)
            _settle()
            after = _replica_batches(metrics_port)
            per_replica = []
            for replica, (total, batches) in after.items():
                old_total, old_batches = before.get(replica, (0.0, 0.0))
                if batches > old_batches:
                    per_replica.append((total - old_total) / (batches - old_batches))
            served_spb = sum(per_replica) / len(per_replica)
            rows.append((replicas, summary, served_spb, client_cores))
            print(
                f"{replicas} replicas: {summary.throughput:.1f} req/s, {served_spb:.2f} "
                f"samples/batch per replica, client {client_cores:.2f} cores, "
                f"{summary.errors} errors",
                flush=True,
            )
        deploy(replace(settings, sim_batch_latency_us=0), 1)
        _drive(address, dataset[:200], limits.max_ongoing_requests)
        ceiling, ceiling_client = _client_cpu(
            address, dataset[: args.requests_per_replica * 2], limits.max_ongoing_requests
        )
    finally:
        serve.shutdown()
        ray.shutdown()

    base = rows[0][1].throughput
    print(
        f"\nSimulatedDevice {args.batch_latency_us} us/batch, [{args.batch_size},256], "
        f"max_valid_num {args.max_valid_num}; "
        f"OIP HTTP binary through Ray's proxy, {args.ingress_replicas} ingress replica(s)\n"
    )
    print("| replicas | req/s | vs 1 | p50 ms | p99 ms | samples/batch per replica | "
          "in-process, same load | diff | client cores | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for replicas, summary, served_spb, client_cores in rows:
        print(
            f"| {replicas} | {summary.throughput:.1f} | {summary.throughput / base:.2f}x | "
            f"{summary.p50_ms:.1f} | {summary.p99_ms:.1f} | {served_spb:.2f} | "
            f"{local_spb:.2f} | {100 * (served_spb / local_spb - 1):+.1f}% | "
            f"{client_cores:.2f} | {summary.errors} |"
        )
    device_bound = local_spb / (args.batch_latency_us * 1e-6)
    print(
        f"\nfront-end ceiling (1 replica, zero-latency device): {ceiling.throughput:.1f} req/s "
        f"(client {ceiling_client:.2f} cores, {ceiling.errors} errors); one replica's device "
        f"bound: {device_bound:.0f} req/s ({local_spb:.1f} samples per {args.batch_latency_us} us "
        "batch). Replicas add throughput only while n x the device bound stays below the "
        "front-end ceiling."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
