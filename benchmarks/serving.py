"""Served vs in-process, measured side by side: ``python -m benchmarks.serving``.

A ``packrunner serve`` subprocess (so the load generator does not share its GIL) and an
in-process PackRunner on the same model file and config are driven by the same open-loop
(Poisson) load generator, :func:`packrunner.bench.latency.open_loop`, over loopback:

1. saturation: every request offered at once; served / in-process throughput per protocol
   (OIP HTTP with binary tensors, OIP gRPC, ``/v1/embeddings`` with text);
2. half load: Poisson arrivals at half the in-process saturation rate; added p50 latency;
3. the server's own ceiling: the same protocols on a zero-latency SimulatedDevice.

The load generator shares the machine's cores with the server; on a shared 2-core host the
ratios include that contention (and other tenants' noise).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import numpy as np

from packrunner import PackRunner
from packrunner.bench.dataset import poprt_dataset
from packrunner.bench.latency import LatencySummary, open_loop
from packrunner.devices.onnx import OnnxDevice
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


@contextmanager
def _server(extra: Sequence[str]) -> Iterator[tuple[str, str]]:
    command = [
        sys.executable, "-m", "packrunner.serve", "--http-port", "0", "--grpc-port", "0",
        "--max-concurrent-requests", "8192", "--max-client-batch-size", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "ready http=" in line:
                fields = dict(part.split("=", 1) for part in line.split()[3:])
                yield fields["http"], fields["grpc"]
                break
        else:
            raise RuntimeError(f"server exited with {process.wait()}")
    finally:
        process.terminate()
        process.wait(timeout=60)
        if process.stderr is not None:
            process.stderr.close()


def _drive(target: Any, inputs: Sequence[dict[str, Any]], rate: float) -> LatencySummary:
    """One open-loop run of ``target``; its connections are closed on the run's own loop."""
    summary, _ = open_loop(target, inputs, rate=rate, requests=len(inputs), finish=target.aclose)
    return summary


def _row(label: str, summary: LatencySummary, baseline: LatencySummary | None = None) -> str:
    ratio = f"{summary.throughput / baseline.throughput:5.2f}x" if baseline else "     -"
    return (
        f"| {label:<28} | {summary.throughput:8.1f} | {ratio} | {summary.p50_ms:8.2f} | "
        f"{summary.p99_ms:8.2f} | {summary.errors:4d} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1200, help="requests per run")
    parser.add_argument("--sim-requests", type=int, default=3000, help="requests per run (sim)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    args = parser.parse_args(argv)
    samples: list[dict[str, Any]] = [
        {"input_ids": s["input_ids"]} for s in poprt_dataset(args.requests)
    ]
    texts = [{"text": text} for text in _texts(samples)]
    flood = 1e6  # offered rate far above capacity: every request at once
    header = (
        "| target                       | req/s    | served/in | p50 ms   | p99 ms   | err  |\n"
        "|---|---|---|---|---|---|"
    )
    threads = ["--threads", str(args.threads)] if args.threads else []

    settings = ServeSettings()
    model = load_model(settings)
    assert isinstance(model.device, OnnxDevice)
    path = model.device.model_path
    print(f"model {path.name}, [16,256], {args.requests} seed-length requests per run\n")

    with PackRunner(OnnxDevice(path, intra_op_num_threads=args.threads), model.config) as runner:
        open_loop(runner, samples[:64], rate=flood, requests=64)  # warm-up
        in_process, _ = open_loop(runner, samples, rate=flood, requests=len(samples))
        half_rate = in_process.throughput / 2
        in_process_half, _ = open_loop(runner, samples, rate=half_rate, requests=len(samples))

    saturated: dict[str, LatencySummary] = {}
    half: dict[str, LatencySummary] = {}
    with _server(threads) as (http, grpc_address):
        targets: dict[str, tuple[Any, list[dict[str, Any]]]] = {
            "OIP HTTP binary": (lambda: HttpV2(http), samples),
            "OIP gRPC": (lambda: Grpc(grpc_address), samples),
            "/v1/embeddings (text)": (lambda: Embeddings(http), texts),
        }
        for label, (make, inputs) in targets.items():
            _drive(make(), inputs[:64], flood)  # connections, warm-up
            saturated[label] = _drive(make(), inputs, flood)
            half[label] = _drive(make(), inputs, half_rate)

    sim_samples = [{"input_ids": s["input_ids"]} for s in poprt_dataset(args.sim_requests)]
    ceiling: dict[str, LatencySummary] = {}
    with _server(["--device", "sim", "--sim-batch-latency-us", "0"]) as (http, grpc_address):
        sim_targets = {
            "OIP HTTP binary": lambda: HttpV2(http),
            "OIP gRPC": lambda: Grpc(grpc_address),
        }
        for label, make in sim_targets.items():
            _drive(make(), sim_samples[:100], flood)
            ceiling[label] = _drive(make(), sim_samples, flood)

    print("Saturation (every request offered at once), onnxruntime default model")
    print(header)
    print(_row("in-process execute_async", in_process))
    for label, summary in saturated.items():
        print(_row(f"served: {label}", summary, in_process))
    print(f"\nHalf load: Poisson at {half_rate:.0f} req/s (half the in-process saturation)")
    print(header)
    print(_row("in-process execute_async", in_process_half))
    for label, summary in half.items():
        print(_row(f"served: {label}", summary, in_process_half))
    for label, summary in half.items():
        added = summary.p50_ms - in_process_half.p50_ms
        print(f"added p50 at half load, {label}: {added:+.2f} ms")
    print("\nServer ceiling: zero-latency SimulatedDevice, every request offered at once")
    print(header)
    for label, summary in ceiling.items():
        print(_row(f"served: {label}", summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
