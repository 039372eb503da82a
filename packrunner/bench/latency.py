"""Latency measurement: PopRT's closed loop, an open (Poisson) loop, and percentile maths."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "LatencySummary",
    "Target",
    "closed_loop",
    "open_loop",
    "percentile",
    "summarize",
]


class Target(Protocol):
    """Anything that serves single samples both blocking and async (PackRunner, the peer)."""

    def execute(self, sample: Any) -> Any: ...

    def execute_async(self, sample: Any) -> Awaitable[Any]: ...


def percentile(values: Sequence[float] | npt.NDArray[np.float64], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` percent at or below it.

    This is the definition PopRT's example uses (``sorted(v)[int(len(v) * 0.99)]`` for p99, up to
    its off-by-one on exact multiples) and never interpolates a latency nobody observed.
    """
    if len(values) == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Throughput and latency percentiles (milliseconds) of one load test."""

    requests: int
    throughput: float
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int = 0
    offered_rate: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def summarize(
    latencies_s: Sequence[float] | npt.NDArray[np.float64],
    wall_s: float,
    *,
    errors: int = 0,
    offered_rate: float | None = None,
) -> LatencySummary:
    """Summarise per-request latencies (seconds) measured over ``wall_s`` seconds."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1e3
    return LatencySummary(
        requests=len(values),
        throughput=len(values) / wall_s if wall_s > 0 else float("nan"),
        avg_ms=float(values.mean()),
        p50_ms=percentile(values, 50),
        p90_ms=percentile(values, 90),
        p99_ms=percentile(values, 99),
        p999_ms=percentile(values, 99.9),
        max_ms=float(values.max()),
        errors=errors,
        offered_rate=offered_rate,
    )


def closed_loop(
    target: Target,
    samples: Sequence[Any],
    *,
    clients: int,
    requests_per_client: int,
    keep_fraction: float = 0.6,
    on_request: Callable[[], None] | None = None,
) -> tuple[LatencySummary, npt.NDArray[np.float64]]:
    """PopRT's latency test: ``clients`` threads each calling blocking ``execute`` in a loop.

    As in PopRT's example, each client drops the first and last ``(1 - keep_fraction) / 2`` of its
    requests (warm-up and drain), and throughput is the kept requests over the span from the
    earliest kept start to the latest kept end.

    Returns:
        The summary and the kept latencies in seconds.
    """
    spans: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start_together = threading.Barrier(clients)

    def client(number: int) -> None:
        start_together.wait()
        for i in range(requests_per_client):
            sample = samples[(number * requests_per_client + i) % len(samples)]
            began = time.perf_counter()
            try:
                target.execute(sample)
            except Exception:
                failures[number] += 1
                continue
            spans[number].append((began, time.perf_counter()))
            if on_request is not None:
                on_request()

    # Daemon threads: a Ctrl-C while they run must not keep the process alive until they finish.
    threads = [
        threading.Thread(target=client, args=(n,), name=f"client-{n}", daemon=True)
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ignored = int(requests_per_client * (1 - keep_fraction) / 2)
    kept = [s for per_client in spans for s in per_client[ignored : len(per_client) - ignored]]
    if not kept:
        raise RuntimeError("closed loop kept no request; raise requests_per_client")
    latencies = np.array([end - began for began, end in kept])
    wall = max(end for _, end in kept) - min(began for began, _ in kept)
    return summarize(latencies, wall, errors=sum(failures)), latencies


def open_loop(
    target: Target,
    samples: Sequence[Any],
    *,
    rate: float,
    requests: int,
    seed: int = 0,
    on_request: Callable[[], None] | None = None,
    finish: Callable[[], Awaitable[None]] | None = None,
) -> tuple[LatencySummary, npt.NDArray[np.float64]]:
    """Poisson arrivals at ``rate`` per second through ``execute_async``.

    Each request's latency counts from its *scheduled* arrival, so a client that falls behind
    schedule (a saturated host) shows up as latency instead of silently lowering the load.
    ``finish`` (e.g. closing a network client) is awaited on the same loop after the last
    request.
    """
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=requests))

    async def run() -> tuple[LatencySummary, npt.NDArray[np.float64]]:
        latencies = np.zeros(requests)
        failures = 0
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(index: int) -> None:
            nonlocal failures
            try:
                await target.execute_async(samples[index % len(samples)])
            except Exception:
                failures += 1
            latencies[index] = loop.time() - (start + arrivals[index])
            if on_request is not None:
                on_request()

        tasks = []
        index = 0
        while index < requests:
            now = loop.time() - start
            while index < requests and arrivals[index] <= now:
                tasks.append(asyncio.ensure_future(one(index)))
                index += 1
            if index < requests:
                await asyncio.sleep(max(0.0, arrivals[index] - (loop.time() - start)))
        await asyncio.gather(*tasks)
        wall = loop.time() - start
        if finish is not None:
            await finish()
        return summarize(latencies, wall, errors=failures, offered_rate=rate), latencies

    return asyncio.run(run())
