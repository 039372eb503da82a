"""Bad requests, limits, overload, deadlines, disconnects and auth, on a gated simulated device.

The device (tests._support.GatedDevice) blocks each batch until the test opens its gate, so
"admitted", "packed" and "waiting" are states the test controls rather than races it hopes to
win. Admission is observed through a hook on the engine, the end of a request through a hook
on the service's request record: events, not sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from packrunner import SimulatedDevice
from packrunner.serve import oip_proto
from packrunner.serve.tokenizer import TextEncoder, build_default_tokenizer
from tests._support import GatedDevice, PoisonDevice, reference

from ._support import ServerThread, served, settings

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
INFER = "/v2/models/gated/infer"


class Gated:
    """A running gated server and the hooks to observe it."""

    def __init__(self, server: ServerThread, device: GatedDevice) -> None:
        self.server = server
        self.device = device
        self.admitted = threading.Semaphore(0)
        self.finished: list[str] = []
        self.finished_event = threading.Condition()
        inner = server.server
        assert inner is not None
        engine, service = inner.engine, inner.service
        original_run, original_record = engine.run, service.record

        async def run(samples: Any, deadline: Any) -> Any:
            self.admitted.release()
            return await original_run(samples, deadline)

        def record(route: str, protocol: Any, status: str, *args: Any, **kw: Any) -> None:
            original_record(route, protocol, status, *args, **kw)
            with self.finished_event:
                self.finished.append(status)
                self.finished_event.notify_all()

        engine.run = run  # type: ignore[method-assign]
        service.record = record  # type: ignore[method-assign]

    @property
    def stats(self) -> Any:
        assert self.server.server is not None
        return self.server.server.engine.runner.stats()

    def wait_finished(self, *statuses: str) -> None:
        """Wait until a request ended with one of ``statuses``."""
        with self.finished_event:
            assert self.finished_event.wait_for(
                lambda: any(s in self.finished for s in statuses), timeout=30
            )


@pytest.fixture
def gated() -> Iterator[Gated]:
    device = GatedDevice(batch_size=1, seq_len=64)
    device.gate.set()  # warm-up must run
    model = served(device, "gated", encoder=TextEncoder(build_default_tokenizer(), 64))
    serve_settings = settings(
        api_key=KEY, max_concurrent_requests=3, payload_limit=64 * 1024, batch_size=1
    )
    with ServerThread(serve_settings, model) as server:
        try:
            yield Gated(server, device)
        finally:
            device.gate.set()


def _v2(ids: list[list[int]], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "input_ids", "shape": [len(ids), len(ids[0])], "datatype": "INT64",
             "data": ids}
        ],
        **extra,
    }  # fmt: skip


def _good(base_url: str, seed: int) -> None:
    ids = np.random.default_rng(seed).integers(1, 30000, (1, 9)).tolist()
    response = httpx.post(f"{base_url}{INFER}", json=_v2(ids), headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    start = response.json()["outputs"][0]
    assert start["name"] == "start_logits"
    expected = reference({"input_ids": np.array(ids[0])})["start_logits"]
    np.testing.assert_array_equal(np.array(start["data"], np.float32), expected)


def _binary_body(ids: np.ndarray, claimed: int | None = None) -> tuple[bytes, int]:
    raw = ids.astype("<i8").tobytes()
    header = json.dumps(
        {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",
                     "parameters": {"binary_data_size": claimed or len(raw)}}]}
    ).encode()  # fmt: skip
    return header + raw, len(header)


def _bad_requests() -> list[tuple[str, dict[str, Any], int, str]]:
    """(label, httpx request kwargs, status, text the error must contain)."""
    ids = np.arange(1, 4, dtype=np.int64)[None, :]
    body, length = _binary_body(ids)
    truncated, truncated_length = _binary_body(ids, claimed=48)
    return [
        ("malformed JSON", {"content": b'{"inputs": ['}, 400, "malformed JSON"),
        ("header length past body",
         {"content": body, "headers": {"Inference-Header-Content-Length": "99999"}},
         400, "Inference-Header-Content-Length"),
        ("header length not a number",
         {"content": body, "headers": {"Inference-Header-Content-Length": "abc"}},
         400, "not an integer"),
        ("truncated binary",
         {"content": truncated,
          "headers": {"Inference-Header-Content-Length": str(truncated_length)}},
         400, "truncated"),
        ("binary but no header length", {"content": body}, 400, "malformed JSON"),
        ("wrong datatype",
         {"json": {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "FP32",
                               "data": [1.0, 2.0]}]}}, 400, "datatype"),
        ("wrong shape",
         {"json": {"inputs": [{"name": "input_ids", "shape": [1, 1, 2], "datatype": "INT64",
                               "data": [1, 2]}]}}, 400, "shape"),
        ("data does not fill shape",
         {"json": {"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64",
                               "data": [1, 2]}]}}, 400, "shape"),
        ("mask not right-padded",
         {"json": {"inputs": [
             {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
             {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64",
              "data": [0, 1, 1]}]}}, 400, "right-padded"),
        ("unknown output", {"json": {**_v2([[1, 2]]), "outputs": [{"name": "nope"}]}},
         400, "unknown output"),
        ("id beyond the vocabulary", {"json": _v2([[1, 2, -5]])}, 400, "negative"),
        ("sequence too long", {"json": _v2([[1] * 65])}, 400, "max_input_length"),
        ("too many sequences", {"json": _v2([[1, 2]] * 5)}, 413, "max_client_batch_size"),
        ("oversize payload", {"content": b" " * (64 * 1024 + 1)}, 413, "payload_limit"),
        ("unknown model", {"json": _v2([[1, 2]]), "url": "/v2/models/nope/infer"}, 404,
         "unknown model"),
        ("missing API key", {"json": _v2([[1, 2]]), "headers": {}}, 401, "API key"),
    ]  # fmt: skip


def test_bad_request_table_with_concurrent_good_requests(gated: Gated) -> None:
    base = gated.server.base_url
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=base, timeout=30) as http:
        good = [pool.submit(_good, base, seed) for seed in range(12)]
        for label, request, status, fragment in _bad_requests():
            url = request.pop("url", INFER)
            headers = request.pop("headers", {**AUTH})
            if headers:
                headers = {**AUTH, **headers}
            response = http.post(url, headers=headers, **request)
            assert response.status_code == status, (label, response.text)
            assert fragment in response.json()["error"], (label, response.text)
        for future in good:
            future.result()


def test_text_route_errors_by_protocol(gated: Gated) -> None:
    long_text = " ".join(["word"] * 100)
    with httpx.Client(base_url=gated.server.base_url, headers=AUTH, timeout=30) as http:
        tei = http.post("/embed", json={"inputs": long_text})
        assert tei.status_code == 422
        assert tei.json()["error_type"] == "validation"
        assert "max_input_length" in tei.json()["error"]
        openai = http.post("/v1/embeddings", json={"model": "gated", "input": long_text})
        assert openai.status_code == 400
        assert openai.json()["error"]["type"] == "invalid_request_error"
        many = http.post("/embed", json={"inputs": ["a"] * 5})
        assert (many.status_code, many.json()["error_type"]) == (422, "validation")
        empty = http.post("/embed", json={"inputs": []})
        assert (empty.status_code, empty.json()["error_type"]) == (400, "empty")
        malformed = http.post("/embed", content=b"{nope")
        assert malformed.status_code == 422
        for path in ("/embed", "/v1/embeddings", "/info"):
            method = http.get if path == "/info" else http.post
            assert method(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        for path in ("/health", "/metrics", "/v2/health/ready", "/v2/health/live"):
            assert http.get(path, headers={"Authorization": ""}).status_code == 200


def test_grpc_api_key(gated: Gated) -> None:
    client = triton_grpc.InferenceServerClient(gated.server.grpc)
    assert client.is_server_ready()
    tensor = triton_grpc.InferInput("input_ids", [1, 3], "INT64")
    tensor.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("gated", [tensor])
    assert "UNAUTHENTICATED" in str(refused.value.status())
    result = client.infer("gated", [tensor], headers={"authorization": f"Bearer {KEY}"})
    expected = reference({"input_ids": np.array([1, 2, 3])})["start_logits"]
    np.testing.assert_array_equal(result.as_numpy("start_logits")[0], expected)


def _post_async(pool: ThreadPoolExecutor, base: str, ids: list[int]) -> Any:
    return pool.submit(httpx.post, f"{base}{INFER}", json=_v2([ids]), headers=AUTH, timeout=60)


def test_overload_is_429_and_resource_exhausted_then_recovers(gated: Gated) -> None:
    base = gated.server.base_url
    gated.device.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        held = [_post_async(pool, base, [i + 1, 2, 3]) for i in range(3)]
        for _ in held:
            assert gated.admitted.acquire(timeout=30)
        refused = httpx.post(f"{base}{INFER}", json=_v2([[1, 2]]), headers=AUTH, timeout=30)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert "overloaded" in refused.json()["error"]
        client = triton_grpc.InferenceServerClient(gated.server.grpc)
        tensor = triton_grpc.InferInput("input_ids", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[1, 2]], np.int64))
        with pytest.raises(InferenceServerException) as exhausted:
            client.infer("gated", [tensor], headers={"authorization": f"Bearer {KEY}"})
        assert "RESOURCE_EXHAUSTED" in str(exhausted.value.status())
        gated.device.gate.set()
        assert [f.result().status_code for f in held] == [200, 200, 200]
    recovered = httpx.post(f"{base}{INFER}", json=_v2([[1, 2]]), headers=AUTH, timeout=30)
    assert recovered.status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert 'packrunner_server_rejected_total{reason="overloaded"} 2.0' in metrics


def test_disconnected_client_sample_is_withdrawn(gated: Gated) -> None:
    """Batch A1 on the device, A2 packed behind it: B waits unpacked; B's client leaves."""
    base = gated.server.base_url
    gated.device.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = _post_async(pool, base, [1, 2, 3])
        assert gated.admitted.acquire(timeout=30)
        second = _post_async(pool, base, [4, 5, 6])
        assert gated.admitted.acquire(timeout=30)
        body = json.dumps(_v2([[7, 8, 9]])).encode()
        host, port = gated.server.http.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert gated.admitted.acquire(timeout=30)
        gated.wait_finished("499")
        assert gated.stats.withdrawn == 1
        gated.device.gate.set()
        assert first.result().status_code == 200
        assert second.result().status_code == 200
    assert gated.stats.completed == gated.stats.requests - 1


def test_deadlines_504_and_deadline_exceeded(gated: Gated) -> None:
    base = gated.server.base_url
    gated.device.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        # One batch blocked on the device, one packed behind it: later samples wait unpacked.
        blockers = [_post_async(pool, base, [i, 2, 3]) for i in (1, 2)]
        for _ in blockers:
            assert gated.admitted.acquire(timeout=30)
        # The v2 timeout parameter (microseconds) expires while the sample waits.
        late = httpx.post(
            f"{base}{INFER}",
            json=_v2([[4, 5]], parameters={"timeout": 50_000}),
            headers=AUTH,
            timeout=30,
        )
        assert late.status_code == 504
        assert "deadline" in late.json()["error"]
        client = triton_grpc.InferenceServerClient(gated.server.grpc)
        tensor = triton_grpc.InferInput("input_ids", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[4, 5]], np.int64))
        with pytest.raises(InferenceServerException) as expired:
            client.infer(
                "gated",
                [tensor],
                headers={"authorization": f"Bearer {KEY}"},
                client_timeout=0.05,
            )
        assert "DEADLINE_EXCEEDED" in str(expired.value.status())
        # The client's deadline is the server's too: whichever side notices first.
        gated.wait_finished(grpc.StatusCode.CANCELLED.name, grpc.StatusCode.DEADLINE_EXCEEDED.name)
        gated.device.gate.set()
        assert [b.result().status_code for b in blockers] == [200, 200]
    # Both expired while waiting to be packed: both samples were withdrawn.
    assert gated.stats.withdrawn == 2
    metrics = httpx.get(f"{base}/metrics").text
    timed_out = re.search(r"^packrunner_server_timed_out_total (\S+)$", metrics, re.MULTILINE)
    assert timed_out is not None and float(timed_out.group(1)) >= 1


def test_device_failure_is_500_and_internal_and_others_are_unaffected() -> None:
    device = PoisonDevice(batch_size=1, seq_len=64)
    model = served(device, "poison")
    with ServerThread(settings(batch_size=1), model) as server:
        url = f"{server.base_url}/v2/models/poison/infer"
        failed = httpx.post(url, json=_v2([[1, PoisonDevice.POISON, 3]]), timeout=30)
        assert failed.status_code == 500
        assert "device failed" in failed.json()["error"]
        client = triton_grpc.InferenceServerClient(server.grpc)
        tensor = triton_grpc.InferInput("input_ids", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[PoisonDevice.POISON, 1]], np.int64))
        with pytest.raises(InferenceServerException) as internal:
            client.infer("poison", [tensor])
        assert "INTERNAL" in str(internal.value.status())
        assert httpx.post(url, json=_v2([[1, 2, 3]]), timeout=30).status_code == 200


def test_queue_bound_is_429_and_request_timeout_is_504() -> None:
    """--max-queued-sequences (the runner's queue) and --request-timeout, the server default."""
    device = GatedDevice(batch_size=1, seq_len=64)
    device.gate.set()
    model = served(device, "gated", max_queue_size=1)
    with ServerThread(settings(batch_size=1, request_timeout=0.2), model) as server:
        assert device.entered.acquire(timeout=0)  # the warm-up batch's entry
        device.gate.clear()
        hooks = Gated(server, device)
        url = f"{server.base_url}{INFER}"
        with ThreadPoolExecutor(2) as pool:
            # A batch on the device and one behind it (packed, or still the one queued
            # sample); both outlive the 0.2 s default deadline while the gate is closed.
            blocked = []
            for i in (1, 2):
                blocked.append(pool.submit(httpx.post, url, json=_v2([[i]]), timeout=30))
                assert hooks.admitted.acquire(timeout=30)
            # Two more sequences cannot both fit a one-sample queue: refused (any already
            # queued sequence of the request is withdrawn with it).
            full = httpx.post(url, json=_v2([[3, 4], [5, 6]]), timeout=30)
            assert full.status_code == 429, full.text
            assert "queue full" in full.json()["error"]
            assert [b.result().status_code for b in blocked] == [504, 504]
        device.gate.set()
        assert server.server is not None
        stats = server.server.engine.runner.stats()
        assert stats.rejected_overloaded == 1
        assert httpx.post(url, json=_v2([[7]]), timeout=30).status_code == 200


async def _grpc_burst(address: str, count: int) -> Counter[str]:
    """``count`` ModelInfer RPCs started at once on one channel; their final status codes."""
    request_class = oip_proto.message_class("ModelInferRequest")
    response_class = oip_proto.message_class("ModelInferResponse")
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )

        async def one(index: int) -> str:
            ids = np.array([101, index % 1000 + 1, 102], "<i8")
            request = request_class(model_name="burst")
            request.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(ids)])
            request.raw_input_contents.append(ids.tobytes())
            try:
                await infer(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                return str(error.code().name)
            return "OK"

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def test_grpc_burst_is_served_or_refused_never_dropped() -> None:
    """1,500 RPCs at once on one channel outrun grpc.aio's serve loop; gRPC core's backlog of
    calls not yet picked up must not drop any (a bare CANCELLED on the client, with gRPC's
    default pending-call limits): each is served or refused by the service's admission."""
    device = SimulatedDevice(batch_size=4, seq_len=64, max_valid_num=8, batch_latency_us=0)
    model = served(device, "burst", max_valid_num=8, timeout_us=1000)
    with ServerThread(settings(max_concurrent_requests=256), model) as server:
        codes = asyncio.run(_grpc_burst(server.grpc, 1500))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= 256, codes
