"""Warm-up before ready, graceful drain, SIGTERM in a real process, flags from the environment,
and models from a Hugging Face checkpoint folder or an ONNX file."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from safetensors.numpy import save_file

from packrunner import PackRunner
from packrunner.cli import build_parser
from packrunner.devices.onnx import OnnxDevice
from packrunner.models import BertConfig, random_bert_weights
from packrunner.serve import ServedModel, load_model
from packrunner.serve.cli import add_arguments, run, settings_from_args
from packrunner.serve.tokenizer import build_default_tokenizer
from tests._support import GatedDevice

from ._support import ServerThread, served, settings

REPO = Path(__file__).resolve().parents[2]


def _gated_model() -> tuple[ServedModel, GatedDevice]:
    device = GatedDevice(batch_size=1, seq_len=64)
    return served(device, "gated"), device


def _infer_body(ids: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64",
                        "data": [ids]}]}  # fmt: skip


def test_not_ready_until_warm_up_ran() -> None:
    model, device = _gated_model()
    server = ServerThread(settings(batch_size=1), model)
    server.launch()
    try:
        # The warm-up batch is on the device: the listeners are open, the server not ready.
        assert device.entered.acquire(timeout=60)
        assert server.server is not None and server.server.http_port is not None
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/health").json() == {"error": "unhealthy", "error_type": "unhealthy"}
            refused = http.post("/v2/models/gated/infer", json=_infer_body([1, 2]))
            assert refused.status_code == 503
            assert "warming" in refused.json()["error"]
        assert not triton_grpc.InferenceServerClient(server.grpc).is_server_ready()
        device.gate.set()
        server.wait_ready()
        assert httpx.get(f"{server.base_url}/v2/health/ready").json() == {"ready": True}
        # One full batch (every row of the [1, 64] shape) ran before ready.
        assert device.batch_sizes == [1]
    finally:
        device.gate.set()
        server.__exit__(None, None, None)


def test_graceful_stop_drains_in_flight_and_refuses_new_requests() -> None:
    model, device = _gated_model()
    device.gate.set()
    with ServerThread(settings(batch_size=1), model) as server:
        assert device.entered.acquire(timeout=0)  # the warm-up batch's entry
        device.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post,
                f"{server.base_url}/v2/models/gated/infer",
                json=_infer_body([5, 6, 7]),
                timeout=60,
            )
            assert device.entered.acquire(timeout=60)
            server.request_stop()
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                assert http.get("/v2/health/ready").status_code == 503
                late = http.post("/v2/models/gated/infer", json=_infer_body([1]))
                assert late.status_code == 503
                assert late.headers["retry-after"] == "1"
                assert "draining" in late.json()["error"]
            device.gate.set()
            assert in_flight.result().status_code == 200
        server.join()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    """A real ``python -m packrunner.serve`` process: SIGTERM while a request is in flight."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PACKRUNNER_DEVICE": "sim"}
    command = [
        sys.executable, "-m", "packrunner.serve", "--http-port", "0", "--grpc-port", "0",
        "--sim-batch-latency-us", "1500000", "--batch-size", "1", "--max-valid-num", "1",
        "--seq-len", "64", "--graceful-shutdown-timeout", "20", "--access-log",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stderr is not None
        ready = ""
        for line in process.stderr:
            if "ready http=" in line:
                ready = line
                break
        port = int(ready.split("http=127.0.0.1:")[1].split()[0])
        body = json.dumps(_infer_body([1, 2, 3])).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as in_flight:
            in_flight.sendall(
                f"POST /v2/models/packrunner-bert/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            # Sent before this scrape's connection opened: already admitted.
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            assert "packrunner_server_in_flight_requests 1.0" in metrics
            process.send_signal(signal.SIGTERM)
            draining = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30)
            assert draining.status_code == 503
            with in_flight.makefile("rb") as reader:
                answer = reader.readline()
            assert answer.startswith(b"HTTP/1.1 200"), answer
        assert process.wait(timeout=60) == 0
        rest = process.stderr.read()
        assert '"route":"v2_infer"' in rest and '"status":"200"' in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_flags_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKRUNNER_API_KEY", "from-env")
    monkeypatch.setenv("PACKRUNNER_MAX_CLIENT_BATCH_SIZE", "7")
    monkeypatch.setenv("PACKRUNNER_AUTO_TRUNCATE", "true")
    monkeypatch.setenv("PACKRUNNER_GRPC_PORT", "off")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configured = settings_from_args(parser.parse_args([]))
    assert configured.api_key == "from-env"
    assert configured.max_client_batch_size == 7
    assert configured.auto_truncate is True
    assert configured.grpc_port is None
    overridden = settings_from_args(
        parser.parse_args(["--api-key", "flag", "--no-auto-truncate", "--hostname", "::1"])
    )
    assert (overridden.api_key, overridden.auto_truncate, overridden.host) == (
        "flag",
        False,
        "::1",
    )
    args = build_parser().parse_args(["serve", "--port", "0", "--served-model-name", "m"])
    assert args.command == "serve" and args.http_port == 0 and args.name == "m"
    assert run(build_parser().parse_args(["serve", "--max-input-length", "999"])) == 2


def _tiny_checkpoint(folder: Path) -> Path:
    config = BertConfig(
        vocab_size=1200, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_layers,
                "num_attention_heads": config.num_heads,
                "intermediate_size": config.intermediate_size,
            }
        )
    )
    weights = random_bert_weights(config, seed=3, with_qa_head=False)
    save_file({f"bert.{k}": v for k, v in weights.items()}, str(folder / "model.safetensors"))
    build_default_tokenizer(config.vocab_size).save(str(folder / "tokenizer.json"))
    return folder


def test_checkpoint_folder_and_onnx_file(tmp_path: Path) -> None:
    """A HF folder builds a packed encoder graph (no torch); its pooled output is the
    embedding. The built ONNX file plus --tokenizer serves the same model."""
    folder = _tiny_checkpoint(tmp_path / "tiny-bert")
    with ServerThread(settings(model=str(folder)), None) as server:
        assert server.server is not None
        model = server.server.model
        assert model.name == "tiny-bert"
        assert model.embedding_output == "sentence_embedding"
        response = httpx.post(
            f"{server.base_url}/v1/embeddings",
            json={"model": "tiny-bert", "input": ["hello there", "abc"]},
            timeout=30,
        ).json()
        device = model.device
        assert isinstance(device, OnnxDevice)
        ids = [e.ids for e in build_default_tokenizer(1200).encode_batch(["hello there", "abc"])]

        async def in_process() -> list[Any]:
            async with PackRunner(OnnxDevice(device.model_path, intra_op_num_threads=1),
                                  model.config) as runner:  # fmt: skip
                return list(
                    await asyncio.gather(
                        *(runner.execute_async({"input_ids": np.array(i)}) for i in ids)
                    )
                )

        expected = asyncio.run(in_process())
        for datum, result in zip(response["data"], expected, strict=True):
            np.testing.assert_array_equal(
                np.asarray(datum["embedding"], np.float32), result["sentence_embedding"]
            )
        onnx_model = load_model(
            settings(model=str(device.model_path), tokenizer=str(folder / "tokenizer.json"))
        )
        assert set(onnx_model.outputs) == {"last_hidden_state", "sentence_embedding"}
        assert onnx_model.encoder is not None and onnx_model.encoder.vocab_size == 1200
    assert not any(t.name.startswith("packrunner-") for t in threading.enumerate())
