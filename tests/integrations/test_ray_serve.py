"""packrunner on Ray Serve: a real local Ray cluster on loopback, the service's HTTP routes.

One Ray instance for the module (starting Ray and deploying take most of the time), two
applications on it, each with two runner replicas:

* ``packrunner`` at ``/``: the default ONNX model, compared bit for bit with an in-process
  runner through tritonclient.http and the openai client;
* ``packrunner-sim`` at ``/sim``: SimulatedDevice with a long batch, so that requests are
  surely on a replica when it is killed, or when the application is deleted.

Ray reports replica restarts, requests in flight and exported metrics only through its status
and metrics endpoints, with no notification, so the waits on them (:func:`_eventually`) look at
that state against a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import pickle
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
import ray
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from packrunner import PackRunner, RunnerConfig
from packrunner.devices.onnx import OnnxDevice
from packrunner.errors import ConfigError
from packrunner.integrations.ray import app_builder, build_application, replica_limits
from packrunner.serve import ServeSettings, load_model
from packrunner.serve.errors import ErrorKind, ServeError
from packrunner.serve.tokenizer import build_default_tokenizer

MODEL = "packrunner-bert"
OUTPUTS = ("start_logits", "end_logits", "last_hidden_state")
ONNX_APP, SIM_APP = "packrunner", "packrunner-sim"
#: Every request in these tests resolves within this (client-side timeout: nothing hangs).
REQUEST_BOUND_S = 60.0
SIM_BATCH_S = 2.0

ONNX_SETTINGS = ServeSettings(
    batch_size=4,
    seq_len=64,
    max_valid_num=8,
    batch_timeout_us=50_000,
    threads=1,
    max_client_batch_size=4,
    graceful_shutdown_timeout=30.0,
)
SIM_SETTINGS = dataclasses.replace(
    ONNX_SETTINGS, device="sim", sim_batch_latency_us=int(SIM_BATCH_S * 1e6)
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for Ray's state to satisfy ``check`` (it offers no notification for these)."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        pause.wait(0.2)


def _two_replicas(settings: ServeSettings) -> Any:
    # No CPU reservations: every replica fits on the 2-core machines CI runs on.
    return build_application(settings, replicas=2, replica_num_cpus=0, ingress_num_cpus=0)


@dataclasses.dataclass(frozen=True)
class RayServe:
    url: str  # Ray Serve's HTTP proxy
    metrics_url: str  # Ray's metrics export (every process's Ray metrics on this node)


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[RayServe]:
    """A local Ray instance bound to 127.0.0.1, no dashboard; Serve's proxy on a free port."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    metrics_port = _free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=metrics_port,
        # Replicas push their metrics this often (default 10 s).
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(_two_replicas(ONNX_SETTINGS), name=ONNX_APP, route_prefix="/")
        serve.run(
            _two_replicas(SIM_SETTINGS),
            name=SIM_APP,
            route_prefix="/sim",
        )
        yield RayServe(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def onnx_reference() -> Iterator[PackRunner]:
    """The same model file and config in process: what the replicas' outputs must equal."""
    model = load_model(ONNX_SETTINGS)
    assert isinstance(model.device, OnnxDevice)
    with PackRunner(
        OnnxDevice(model.device.model_path, intra_op_num_threads=1), model.config
    ) as runner:
        yield runner


def _sequences(seed: int, lengths: tuple[int, ...]) -> list[npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 30000, length).astype(np.int64) for length in lengths]


def _expected(runner: PackRunner, sequences: list[npt.NDArray[np.int64]]) -> dict[str, Any]:
    async def run() -> list[Any]:
        return list(
            await asyncio.gather(*(runner.execute_async({"input_ids": s}) for s in sequences))
        )

    results = asyncio.run(run())
    width = max(len(s) for s in sequences)
    out = {}
    for name in OUTPUTS:
        tensor = np.zeros((len(sequences), width, *results[0][name].shape[1:]), np.float32)
        for row, result in enumerate(results):
            tensor[row, : len(result[name])] = result[name]
        out[name] = tensor
    return out


def _triton_infer(base_url: str, sequences: list[npt.NDArray[np.int64]]) -> Any:
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", (ids > 0).astype(np.int64))):
        tensor = triton_http.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = triton_http.InferenceServerClient(base_url.removeprefix("http://"))
    outputs = [triton_http.InferRequestedOutput(n) for n in OUTPUTS]
    return client.infer(MODEL, inputs, outputs=outputs)


def test_replica_limits_follow_the_batch_size() -> None:
    config = RunnerConfig(batch_size=16, seq_len=256, max_valid_num=40)
    limits = replica_limits(config)
    assert limits.max_ongoing_requests == 160
    assert limits.max_queued_requests == 160
    assert limits.target_ongoing_requests == 80


def test_serve_errors_cross_process_boundaries_intact() -> None:
    error = ServeError(ErrorKind.OVERLOADED, "queue full", retry_after_s=3)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.message, copy.retry_after_s) == (ErrorKind.OVERLOADED, "queue full", 3)


def test_app_builder_reads_serve_run_arguments() -> None:
    application = app_builder({"device": "sim", "replicas": "2", "batch_size": "8"})
    assert isinstance(application, serve.Application)
    with pytest.raises(ConfigError, match="unknown argument"):
        app_builder({"no_such_setting": "1"})
    with pytest.raises(ConfigError, match="batch_size"):
        app_builder({"batch_size": "many"})
    with pytest.raises(ConfigError, match="max_replicas"):
        app_builder({"replicas": "3", "max_replicas": "2"})


def test_replica_errors_reach_the_client_with_their_status(ray_serve: RayServe) -> None:
    """A replica's own refusal (an id beyond the vocabulary, checked by its runner) comes back
    as the same 400 and message as from ``packrunner serve``."""
    body = {
        "inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64",
                    "data": [101, 10**7, 102]}]
    }  # fmt: skip
    with httpx.Client(timeout=REQUEST_BOUND_S) as http:
        response = http.post(f"{ray_serve.url}/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 400, response.text
    assert "input_ids" in response.json()["error"]


@pytest.mark.parametrize("lengths", [(37,), (12, 64, 5)], ids=["one", "many"])
def test_tritonclient_http_equals_in_process(
    ray_serve: RayServe, onnx_reference: PackRunner, lengths: tuple[int, ...]
) -> None:
    # Several requests, so that both replicas answer some.
    for seed in range(4):
        sequences = _sequences(seed * 10 + len(lengths), lengths)
        expected = _expected(onnx_reference, sequences)
        result = _triton_infer(ray_serve.url, sequences)
        for name in OUTPUTS:
            got = result.as_numpy(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_negative_control_detects_a_wrong_answer(
    ray_serve: RayServe, onnx_reference: PackRunner
) -> None:
    first, second = _sequences(99, (30, 30))
    result = _triton_infer(ray_serve.url, [first])
    expected = _expected(onnx_reference, [second])
    assert not np.array_equal(result.as_numpy("start_logits"), expected["start_logits"])


def test_openai_embeddings_equal_in_process(
    ray_serve: RayServe, onnx_reference: PackRunner
) -> None:
    texts = ["The cat sat on the mat.", "Packing puts several sequences in one row!", "x"]
    client = openai.OpenAI(base_url=f"{ray_serve.url}/v1", api_key="unused", max_retries=0)
    response = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    ids = [np.array(e.ids, np.int64) for e in build_default_tokenizer().encode_batch(texts)]

    async def run() -> list[Any]:
        return list(
            await asyncio.gather(*(onnx_reference.execute_async({"input_ids": i}) for i in ids))
        )

    expected = [r["last_hidden_state"].mean(axis=0, dtype=np.float32) for r in asyncio.run(run())]
    assert [d.index for d in response.data] == [0, 1, 2]
    for datum, vector in zip(response.data, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(datum.embedding, np.float32), vector)


def test_health_metrics_and_replica_metrics(ray_serve: RayServe) -> None:
    with httpx.Client(base_url=ray_serve.url, timeout=REQUEST_BOUND_S) as http:
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/health").status_code == 200
        assert http.post("/embed", json={"inputs": "hello"}).status_code == 200
        text = http.get("/metrics").text
    embeds = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "packrunner_server_requests_total"
        and sample.labels == {"route": "tei_embed", "protocol": "tei", "status": "200"}
    ]
    assert embeds == [1.0]
    # Each runner replica keeps its own registry (runner statistics, batches).
    handle = serve.get_deployment_handle("PackRunnerReplica", app_name=ONNX_APP)
    replica_text = handle.metrics.remote().result(timeout_s=REQUEST_BOUND_S).decode()
    batches = re.search(r"^packrunner_server_batch_samples_count\S* (\S+)$", replica_text, re.M)
    assert batches is not None and float(batches.group(1)) >= 1  # at least the warm-up batch
    assert "packrunner_queue_depth" in replica_text


def _replicas_reporting_batches(metrics_url: str) -> set[str]:
    """Replicas of the ONNX application whose batches Ray's metrics export shows."""
    text = httpx.get(metrics_url, timeout=REQUEST_BOUND_S).text
    return {
        sample.labels["replica"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_packrunner_replica_batch_samples_count"
        and sample.labels.get("application") == ONNX_APP
        and sample.labels.get("deployment") == "PackRunnerReplica"
        and sample.labels.get("model") == MODEL
        and sample.value >= 1
    }


def test_ray_metrics_show_every_replica(ray_serve: RayServe) -> None:
    """Each runner replica's batches reach Ray's metrics system, tagged with its replica id."""
    # Every replica ran its warm-up batch; Ray exports on a timer.
    _eventually(
        lambda: len(_replicas_reporting_batches(ray_serve.metrics_url)) == 2,
        30,
        "both replicas' batch metrics in Ray's export",
    )


def _sim_expected(sequence: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    model = load_model(dataclasses.replace(SIM_SETTINGS, sim_batch_latency_us=0))
    with PackRunner(model.device, model.config) as runner:
        return np.asarray(runner.execute({"input_ids": sequence})["start_logits"], np.float32)


def _sim_request(base_url: str, sequence: npt.NDArray[np.int64]) -> httpx.Response:
    body = {
        "inputs": [
            {
                "name": "input_ids",
                "shape": [1, len(sequence)],
                "datatype": "INT64",
                "data": sequence.tolist(),
            }
        ],
        "outputs": [{"name": "start_logits"}],
    }
    with httpx.Client(timeout=REQUEST_BOUND_S) as http:
        return http.post(f"{base_url}/sim/v2/models/{MODEL}/infer", json=body)


def _ingress_in_flight(base_url: str) -> float:
    text = httpx.get(f"{base_url}/sim/metrics", timeout=REQUEST_BOUND_S).text
    found = re.search(r"^packrunner_server_in_flight_requests (\S+)$", text, re.M)
    assert found is not None
    return float(found.group(1))


def _runner_replica_actors() -> set[str]:
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{SIM_APP}#PackRunnerReplica#")
    }


def _running_sim_replicas() -> int:
    status = serve.status().applications[SIM_APP].deployments["PackRunnerReplica"]
    return sum(n for state, n in status.replica_states.items() if state == "RUNNING")


def _answered(response: httpx.Response, expected: npt.NDArray[np.float32]) -> bool:
    """True for a correct answer; False for the clear 503 of a replica that died."""
    if response.status_code == 503:
        assert "runner replica serving this request died" in response.json()["error"]
        assert response.headers["retry-after"] == "1"
        return False
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32), expected.ravel())
    return True


def test_killing_a_replica_mid_load(ray_serve: RayServe) -> None:
    """In-flight requests on the killed replica get a clear 503; the other replica serves on;
    Ray starts a replacement; every request resolves within the bound."""
    sequence = _sequences(5, (10,))[0]
    expected = _sim_expected(sequence)
    count = 16
    before = _runner_replica_actors()
    assert len(before) == 2
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_sim_request, ray_serve.url, sequence) for _ in range(count)]
        # Each batch takes SIM_BATCH_S: once all are in the ingress, both replicas hold some.
        _eventually(lambda: _ingress_in_flight(ray_serve.url) >= count, 30, "requests in flight")
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"))
        done, pending = concurrent.futures.wait(futures, timeout=REQUEST_BOUND_S * 2)
    assert not pending, "a request hung"
    answered = [_answered(f.result(), expected) for f in futures]
    assert any(answered), "the surviving replica must keep serving"
    assert not all(answered), "the killed replica had requests in flight"
    _eventually(
        lambda: _running_sim_replicas() == 2 and len(_runner_replica_actors() - before) == 1,
        120,
        "Ray to replace the killed replica",
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda _: _sim_request(ray_serve.url, sequence), range(4)))
    assert all(_answered(r, expected) for r in after)


def test_graceful_shutdown_drains_in_flight_requests(ray_serve: RayServe) -> None:
    """Deleting the application lets every admitted request finish with its answer."""
    sequence = _sequences(6, (12,))[0]
    expected = _sim_expected(sequence)
    count = 8
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(_sim_request, ray_serve.url, sequence) for _ in range(count)]
        _eventually(lambda: _ingress_in_flight(ray_serve.url) >= count, 30, "requests in flight")
        serve.delete(SIM_APP)
        done, pending = concurrent.futures.wait(futures, timeout=REQUEST_BOUND_S * 2)
    assert not pending, "a request hung"
    assert all(_answered(f.result(), expected) for f in futures)
