"""Soak / overload: offer 10x the runner's capacity, then check that it recovers.

Three phases on one SimulatedDevice-backed runner (seed length distribution):

1. **capacity**: a closed loop keeps the queue busy for ``--measure`` seconds; samples/s = C.
2. **overload**: an open loop offers ``--factor`` x C samples/s for ``--duration`` seconds
   (default 60). Reported: offered and accepted rates, rejections (``OverloadedError``) and the
   latency of a rejection (how long ``execute_async`` takes to say no), p50 / p99 / max, the
   latency of accepted requests, and every outcome by type.
3. **recovery**: once every accepted request has resolved, capacity is measured again; the
   ratio to phase 1 says whether the runner came back to full throughput.

Phases 2 and 3 repeat ``--rounds`` times; RSS (resident memory, from /proc) is printed before
and after each round, so retained memory (flat after round 1) shows apart from a leak (growing
every round). Not a test: nothing is asserted.

    python -m benchmarks.overload [--duration 60] [--rounds 2] [--factor 10]
        [--batch-latency-us 50000] [--request-timeout S]

The default device is slower than the seed's IPU (50 ms per [16, 256] batch) so that a Python
load generator can offer 10x its capacity on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from packrunner import OverloadedError, PackRunner, RunnerConfig, SimulatedDevice
from packrunner.bench.dataset import poprt_dataset


def _ignore_future(callback: Any, argument: float, _: object) -> None:
    callback(argument)


def rss_mib() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def capacity(runner: PackRunner, samples: list[dict[str, Any]], seconds: float) -> float:
    """Samples/s with enough callers in flight to keep every batch full."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        k = offset
        while time.monotonic() < stop_at:
            await runner.execute_async(samples[k % len(samples)])
            done += 1
            k += 97

    started = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(512)))
    return done / (time.monotonic() - started)


def percentiles(values: list[float], unit: str = "us") -> str:
    if not values:
        return "n/a"
    scale = {"us": 1e6, "ms": 1e3}[unit]
    p50, p99 = np.percentile(values, [50, 99]) * scale
    return f"p50 {p50:.0f} {unit}, p99 {p99:.0f} {unit}, max {max(values) * scale:.0f} {unit}"


async def overload(
    runner: PackRunner,
    samples: list[dict[str, Any]],
    rate: float,
    seconds: float,
    request_timeout: float | None,
) -> None:
    rejection_s: list[float] = []
    accepted: list[asyncio.Future[Any]] = []
    latencies: list[float] = []

    def record_latency(submitted: float) -> None:
        latencies.append(time.monotonic() - submitted)

    tick_s = 0.01
    started = time.monotonic()
    offered = 0
    k = 0
    while (now := time.monotonic()) < started + seconds:
        due = int(rate * (now - started)) - offered
        for _ in range(due):
            sample = samples[k % len(samples)]
            k += 1
            before = time.perf_counter()
            try:
                future = runner.execute_async(sample, timeout=request_timeout)
            except OverloadedError:
                rejection_s.append(time.perf_counter() - before)
                continue
            accepted.append(future)
            future.add_done_callback(partial(_ignore_future, record_latency, time.monotonic()))
        offered += due
        await asyncio.sleep(tick_s)  # pacing of the open-loop generator
    elapsed = time.monotonic() - started
    outcomes = await asyncio.gather(*accepted, return_exceptions=True)
    kinds = Counter(type(o).__name__ if isinstance(o, BaseException) else "ok" for o in outcomes)
    stats = runner.stats()
    print(
        f"  offered {offered / elapsed:,.0f} samples/s ({offered:,} in {elapsed:.1f} s); "
        f"accepted {len(accepted):,}, rejected {len(rejection_s):,} "
        f"({len(rejection_s) / max(offered, 1):.0%})"
    )
    print(f"  rejection latency: {percentiles(rejection_s)}")
    print(f"  accepted request latency: {percentiles(latencies, 'ms')}")
    print(f"  outcomes of accepted requests: {dict(kinds)}")
    print(
        f"  runner: completed {stats.completed:,}, withdrawn {stats.withdrawn:,}, "
        f"discarded {stats.discarded:,}, rejected_overloaded {stats.rejected_overloaded:,}, "
        f"queue depth now {stats.queue_depth}"
    )


async def run(args: argparse.Namespace) -> None:
    samples = poprt_dataset(4096)
    device = SimulatedDevice(batch_latency_us=args.batch_latency_us)
    config = RunnerConfig(max_queue_size=args.max_queue_size)
    async with PackRunner(device, config) as runner:
        await runner.warmup_async(timeout=30)
        before = await capacity(runner, samples, args.measure)
        rss_before = rss_mib()
        print(f"1. capacity: {before:,.0f} samples/s; RSS {rss_before:.1f} MiB")
        rate = args.factor * before
        # Several rounds tell retained memory (allocator high-water marks, flat after the first
        # round) from a leak (growing every round).
        for round_number in range(1, args.rounds + 1):
            print(
                f"2. overload round {round_number}: {args.factor:g}x = {rate:,.0f} samples/s "
                f"for {args.duration:g} s"
            )
            await overload(runner, samples, rate, args.duration, args.request_timeout)
            after = await capacity(runner, samples, args.measure)
            rss_after = rss_mib()
            print(
                f"3. recovery: {after:,.0f} samples/s = {after / before:.2f}x the capacity "
                f"before; RSS {rss_after:.1f} MiB ({rss_after - rss_before:+.1f} MiB); "
                f"health {runner.health().state.value}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="overload seconds")
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / capacity")
    parser.add_argument("--measure", type=float, default=5.0, help="capacity phase seconds")
    parser.add_argument("--rounds", type=int, default=2, help="overload + recovery rounds")
    parser.add_argument("--batch-latency-us", type=int, default=50_000)
    parser.add_argument("--max-queue-size", type=int, default=1024)
    parser.add_argument(
        "--request-timeout", type=float, default=None, help="deadline of each request (s)"
    )
    args = parser.parse_args()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
