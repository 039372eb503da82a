"""Served vs in-process, measured side by side: ``python -m benchmarks.serving``.

A ``packrunner serve`` subprocess (so the load generator does not share its GIL) and an
in-process PackRunner with the *same* device and runner configuration (both built by
:func:`packrunner.serve.load_model` from the same settings) are driven by the same open-loop
(Poisson) load generator, :func:`packrunner.bench.latency.open_loop`, in this process, over
loopback. For each device:

1. saturation: every request offered at once; served / in-process throughput per protocol
   (OIP HTTP with binary tensors, OIP gRPC, ``/v1/embeddings`` with text);
2. half load: Poisson arrivals at half the in-process saturation rate; added p50 latency.

Devices: onnxruntime (the default model); a SimulatedDevice that *sleeps* for onnxruntime's
measured batch time (same batching, no device CPU: what is left of the gap is the protocols'
own cost, not contention with the device for the cores); and a zero-latency SimulatedDevice
(the server's own ceiling). Repeats are interleaved (in-process, then each protocol, per
round) and summarised by medians; ratios are medians of per-round ratios.

CPU: the load generator runs in this process in both arms. In-process it pays only
``execute_async`` and shares this process with the runner; served, it pays the HTTP / gRPC
client stack, on the same cores as the server. Both are reported per request (``cpu ms``: for
in-process the whole process; for served the server process, then ``+`` this client process),
so the share of the machine the client takes is visible next to each ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import numpy as np

from packrunner import PackRunner
from packrunner.bench.dataset import poprt_dataset
from packrunner.bench.latency import LatencySummary, open_loop
from packrunner.serve import ServeSettings, load_model, oip_proto

MODEL = "packrunner-bert"
REPO = Path(__file__).resolve().parents[1]


class _Http:
    """An aiohttp session opened on the load generator's loop (httpx's async pool was the
    bottleneck above ~16 concurrent requests here, so it would have measured the client)."""

    def __init__(self, address: str, connections: int = 512) -> None:
        self._address = address
        self._connections = connections
        self._client: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._client is None:
            self._client = aiohttp.ClientSession(
                f"http://{self._address}",
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=120),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    def execute(self, sample: Any) -> Any:
        raise NotImplementedError("open loop only")


class HttpV2(_Http):
    """OIP REST with binary input and output tensors, as tritonclient sends them."""

    async def execute_async(self, sample: dict[str, Any]) -> Any:
        raw = np.asarray(sample["input_ids"], "<i8").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {"name": "input_ids", "shape": [1, len(sample["input_ids"])],
                     "datatype": "INT64", "parameters": {"binary_data_size": len(raw)}}
                ],
                "outputs": [{"name": "start_logits", "parameters": {"binary_data": True}}],
            }
        ).encode()  # fmt: skip
        async with self.session().post(
            f"/v2/models/{MODEL}/infer",
            data=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header))},
        ) as response:
            response.raise_for_status()
            return await response.read()


class Grpc:
    """OIP gRPC ModelInfer with raw input contents."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._request = oip_proto.message_class("ModelInferRequest")
        self._response = oip_proto.message_class("ModelInferResponse")

    async def execute_async(self, sample: dict[str, Any]) -> Any:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._address)
            self._call = self._channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=self._request.SerializeToString,
                response_deserializer=self._response.FromString,
            )
        ids = np.asarray(sample["input_ids"], "<i8")
        request = self._request(model_name=MODEL)
        request.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(ids)])
        request.outputs.add(name="start_logits")
        request.raw_input_contents.append(ids.tobytes())
        return await self._call(request, timeout=120)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def execute(self, sample: Any) -> Any:
        raise NotImplementedError("open loop only")


class Embeddings(_Http):
    """OpenAI ``/v1/embeddings`` with text (one text per request, base64 answers)."""

    async def execute_async(self, sample: dict[str, Any]) -> Any:
        body = {"model": MODEL, "input": sample["text"], "encoding_format": "base64"}
        async with self.session().post("/v1/embeddings", json=body) as response:
            response.raise_for_status()
            answer = await response.json()
        return base64.b64decode(answer["data"][0]["embedding"])


def _texts(samples: Sequence[dict[str, Any]], seed: int = 0) -> list[str]:
    """Texts that the default tokenizer turns into exactly the samples' lengths (3-letter words
    are single pieces of its vocabulary; [CLS] and [SEP] make up the other two)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = []
    for sample in samples:
        words = max(1, len(sample["input_ids"]) - 2)
        texts.append(" ".join("".join(w) for w in rng.choice(letters, (words, 3))))
    return texts


@dataclass(frozen=True, slots=True)
class _Server:
    http: str
    grpc: str
    pid: int


@contextmanager
def _server(extra: Sequence[str]) -> Iterator[_Server]:
    command = [
        sys.executable, "-m", "packrunner.serve", "--http-port", "0", "--grpc-port", "0",
        "--max-concurrent-requests", "8192", "--max-client-batch-size", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    stderr = process.stderr
    try:
        for line in stderr:
            if "ready http=" in line:
                fields = dict(part.split("=", 1) for part in line.split()[3:])
                break
        else:
            raise RuntimeError(f"server exited with {process.wait()}")
        # Keep reading: a full stderr pipe would block the server at its next log line.
        drain = threading.Thread(target=stderr.read, name="server-stderr", daemon=True)
        drain.start()
        yield _Server(fields["http"], fields["grpc"], process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
        stderr.close()


def _process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of ``pid`` (Linux ``/proc``), or of this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class _Run:
    """One open-loop run and the CPU it cost per request."""

    summary: LatencySummary
    cpu_ms: float  # in-process: this process; served: the server process
    client_cpu_ms: float | None = None  # served: this (load generator) process


def _drive(
    target: Any, inputs: Sequence[dict[str, Any]], rate: float, server_pid: int | None = None
) -> _Run:
    """One open-loop run of ``target``; its connections are closed on the run's own loop."""
    finish = None if isinstance(target, PackRunner) else target.aclose
    before = _process_cpu_s(server_pid), _process_cpu_s(None)
    summary, _ = open_loop(target, inputs, rate=rate, requests=len(inputs), finish=finish)
    after = _process_cpu_s(server_pid), _process_cpu_s(None)
    per_request = 1e3 / len(inputs)
    if server_pid is None:
        return _Run(summary, (after[1] - before[1]) * per_request)
    return _Run(summary, (after[0] - before[0]) * per_request, (after[1] - before[1]) * per_request)


@dataclass
class _Arm:
    """Every round's run of one target at one load."""

    label: str
    runs: list[_Run]

    def median(self, value: Callable[[_Run], float]) -> float:
        return statistics.median(value(run) for run in self.runs)


def _row(arm: _Arm, baseline: _Arm | None, *, added: bool) -> str:
    throughput = arm.median(lambda r: r.summary.throughput)
    p50 = arm.median(lambda r: r.summary.p50_ms)
    ratio = added_p50 = "-"
    if baseline is not None and baseline is not arm:
        pairs = list(zip(arm.runs, baseline.runs, strict=True))
        speed = statistics.median(a.summary.throughput / b.summary.throughput for a, b in pairs)
        ratio = f"{speed:.2f}x"
        added_p50 = (
            f"{statistics.median(a.summary.p50_ms - b.summary.p50_ms for a, b in pairs):+.1f}"
        )
    cpu = f"{arm.median(lambda r: r.cpu_ms):.2f}"
    if arm.runs[0].client_cpu_ms is not None:
        cpu += f" + {arm.median(lambda r: r.client_cpu_ms or 0.0):.2f}"
    errors = sum(r.summary.errors for r in arm.runs)
    middle = added_p50 if added else ratio
    return (
        f"| {arm.label} | {throughput:.1f} | {middle} | {p50:.1f} | "
        f"{arm.median(lambda r: r.summary.p99_ms):.1f} | {cpu} | {errors} |"
    )


def _table(title: str, arms: Sequence[_Arm], baseline: _Arm | None, *, added: bool) -> str:
    middle = "added p50 ms" if added else "served / in-process"
    lines = [
        title,
        f"| target | req/s | {middle} | p50 ms | p99 ms | cpu ms/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(arm, baseline, added=added) for arm in arms]
    return "\n".join(lines)


def _compare(
    name: str,
    settings: ServeSettings,
    server_flags: Sequence[str],
    samples: Sequence[dict[str, Any]],
    texts: Sequence[dict[str, Any]] | None,
    rounds: int,
) -> tuple[str, float]:
    """In-process vs served on one device: the report and the device's mean batch time (s).

    ``texts`` None leaves ``/v1/embeddings`` out (a SimulatedDevice has no embedding output).
    """
    model = load_model(settings)  # the device and config the server builds from these flags
    flood = 1e6  # offered rate far above capacity: every request at once
    protocols: list[tuple[str, Callable[[_Server], Any], Sequence[dict[str, Any]]]] = [
        ("OIP HTTP binary", lambda s: HttpV2(s.http), samples),
        ("OIP gRPC", lambda s: Grpc(s.grpc), samples),
    ]
    if texts is not None:
        protocols.append(("/v1/embeddings (text)", lambda s: Embeddings(s.http), texts))
    saturated = [_Arm("in-process execute_async", [])]
    saturated += [_Arm(f"served: {label}", []) for label, _, _ in protocols]
    half = [_Arm(arm.label, []) for arm in saturated]
    half_rate = 0.0
    batch_s = 0.0
    with PackRunner(model.device, model.config) as runner, _server(server_flags) as server:
        open_loop(runner, samples[:64], rate=flood, requests=64)  # warm-up
        for make, inputs in ((m, i) for _, m, i in protocols):
            _drive(make(server), inputs[:64], flood)  # connections, warm-up
        for round_number in range(rounds):
            saturated[0].runs.append(_drive(runner, samples, flood))
            if round_number == 0:
                half_rate = saturated[0].runs[0].summary.throughput / 2
                stats = runner.stats()
                batch_s = stats.device_busy_s / max(1, stats.batches)
            half[0].runs.append(_drive(runner, samples, half_rate))
            for index, (_, make, inputs) in enumerate(protocols, start=1):
                saturated[index].runs.append(_drive(make(server), inputs, flood, server.pid))
                half[index].runs.append(_drive(make(server), inputs, half_rate, server.pid))
    report = "\n\n".join(
        (
            _table(
                f"{name}: saturation (every request offered at once)",
                saturated,
                saturated[0],
                added=False,
            ),
            _table(
                f"{name}: half load (Poisson at {half_rate:.0f} req/s)",
                half,
                half[0],
                added=True,
            ),
        )
    )
    return report, batch_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1200, help="requests per run")
    parser.add_argument("--sim-requests", type=int, default=3000, help="requests per run (sim)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    args = parser.parse_args(argv)
    samples: list[dict[str, Any]] = [
        {"input_ids": s["input_ids"]} for s in poprt_dataset(args.requests)
    ]
    texts = [{"text": text} for text in _texts(samples)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    settings = ServeSettings(threads=args.threads)
    print(f"[16,256], {args.requests} seed-length requests per run, {args.rounds} rounds\n")

    onnx_report, batch_s = _compare("onnxruntime", settings, threads, samples, texts, args.rounds)
    print(onnx_report, flush=True)
    latency_us = round(batch_s * 1e6)
    sleeping = ["--device", "sim", "--sim-batch-latency-us", str(latency_us)]
    sim_settings = ServeSettings(device="sim", sim_batch_latency_us=latency_us)
    sleep_report, _ = _compare(
        f"\nSimulatedDevice sleeping {latency_us / 1e3:.1f} ms (onnxruntime's batch time)",
        sim_settings, sleeping, samples, None, args.rounds,
    )  # fmt: skip
    print(sleep_report, flush=True)

    sim_samples = [{"input_ids": s["input_ids"]} for s in poprt_dataset(args.sim_requests)]
    ceiling = [_Arm("served: OIP HTTP binary", []), _Arm("served: OIP gRPC", [])]
    with _server(["--device", "sim", "--sim-batch-latency-us", "0"]) as server:
        clients: list[Callable[[], Any]] = [
            lambda: HttpV2(server.http),
            lambda: Grpc(server.grpc),
        ]
        for make in clients:
            _drive(make(), sim_samples[:100], 1e6)  # connections, warm-up
        for _ in range(args.rounds):
            for arm, make in zip(ceiling, clients, strict=True):
                arm.runs.append(_drive(make(), sim_samples, 1e6, server.pid))
    title = "Server ceiling: zero-latency SimulatedDevice, every request at once"
    print(f"\n{_table(title, ceiling, None, added=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
