"""Open Inference Protocol with the real clients: tritonclient.http (binary, JSON) and .grpc.

Served outputs must equal the in-process runner's bit for bit (same model file, same config,
same batch composition).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from packrunner import PackRunner
from packrunner.serve import oip_proto

from ._support import ServerThread

MODEL = "packrunner-bert"
OUTPUTS = ("start_logits", "end_logits", "last_hidden_state")


def _sequences(seed: int, lengths: Sequence[int]) -> list[npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 30000, length).astype(np.int64) for length in lengths]


def _padded(sequences: list[npt.NDArray[np.int64]]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int64)
    mask = np.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


async def _reference(runner: PackRunner, sequences: list[npt.NDArray[np.int64]]) -> list[Any]:
    return list(await asyncio.gather(*(runner.execute_async({"input_ids": s}) for s in sequences)))


def _expected(runner: PackRunner, sequences: list[npt.NDArray[np.int64]]) -> dict[str, Any]:
    results = asyncio.run(_reference(runner, sequences))
    width = max(len(s) for s in sequences)
    out = {}
    for name in OUTPUTS:
        first = results[0][name]
        tensor = np.zeros((len(sequences), width, *first.shape[1:]), np.float32)
        for row, result in enumerate(results):
            tensor[row, : len(result[name])] = result[name]
        out[name] = tensor
    return out


def _inputs(
    module: Any, ids: npt.NDArray[Any], mask: npt.NDArray[Any] | None, **kw: Any
) -> list[Any]:
    tensors = [("input_ids", ids)] + ([("attention_mask", mask)] if mask is not None else [])
    inputs = []
    for name, array in tensors:
        tensor = module.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, **kw)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_metadata(served: ServerThread, protocol: str) -> None:
    module: Any = triton_http if protocol == "http" else triton_grpc
    client = module.InferenceServerClient(served.http if protocol == "http" else served.grpc)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    if protocol == "http":
        assert not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata(MODEL)
    if protocol == "grpc":
        metadata = {
            "name": metadata.name,
            "inputs": [{"name": t.name, "shape": list(t.shape)} for t in metadata.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape)} for t in metadata.outputs],
        }
    assert metadata["name"] == MODEL
    assert [t["name"] for t in metadata["inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert all(t["shape"] == [-1, -1] for t in metadata["inputs"])
    shapes = {t["name"]: t["shape"] for t in metadata["outputs"]}
    assert shapes == {
        "start_logits": [-1, -1],
        "end_logits": [-1, -1],
        "last_hidden_state": [-1, -1, 128],
    }
    if protocol == "http":
        server = client.get_server_metadata()
        assert "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize(("protocol", "binary"), [("http", True), ("http", False), ("grpc", True)])
@pytest.mark.parametrize("lengths", [(37,), (12, 64, 5)], ids=["one", "many"])
def test_infer_equals_in_process(
    served: ServerThread,
    reference_runner: PackRunner,
    protocol: str,
    binary: bool,
    lengths: tuple[int, ...],
) -> None:
    sequences = _sequences(len(lengths) * 7 + int(binary), lengths)
    expected = _expected(reference_runner, sequences)
    ids, mask = _padded(sequences)
    if protocol == "http":
        client: Any = triton_http.InferenceServerClient(served.http)
        inputs = _inputs(triton_http, ids, mask if len(lengths) > 1 else None, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    else:
        client = triton_grpc.InferenceServerClient(served.grpc)
        inputs = _inputs(triton_grpc, ids, mask if len(lengths) > 1 else None)
        outputs = [triton_grpc.InferRequestedOutput(n) for n in OUTPUTS]
    result = client.infer(MODEL, inputs, outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert (response["id"] if protocol == "http" else response.id) == "req-7"
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_http_default_outputs_and_single_dimension(
    served: ServerThread, reference_runner: PackRunner
) -> None:
    """No requested outputs: all of them, binary (tritonclient's binary_data_output); [L] ids."""
    (sequence,) = _sequences(3, (20,))
    expected = _expected(reference_runner, [sequence])
    client = triton_http.InferenceServerClient(served.http)
    tensor = triton_http.InferInput("input_ids", [20], "INT64")
    tensor.set_data_from_numpy(sequence)
    result = client.infer(MODEL, [tensor])
    for name in OUTPUTS:
        np.testing.assert_array_equal(result.as_numpy(name), expected[name])


def test_negative_control_detects_a_wrong_answer(
    served: ServerThread, reference_runner: PackRunner
) -> None:
    """The equality check bites: a different sequence gives different outputs."""
    first, second = _sequences(11, (30, 30))
    client = triton_http.InferenceServerClient(served.http)
    result = client.infer(MODEL, _inputs(triton_http, first[None, :], None))
    expected = _expected(reference_runner, [second])
    assert not np.array_equal(result.as_numpy("start_logits"), expected["start_logits"])


def test_grpc_timeout_parameter_and_typed_contents(served: ServerThread) -> None:
    """Typed contents in (not raw); raw_output_contents out; a generous deadline passes."""
    channel = grpc.insecure_channel(served.grpc)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input_ids", datatype="INT32", shape=[1, 4])
    tensor.contents.int_contents.extend([101, 2000, 2001, 102])
    request.parameters["timeout"].int64_param = 10_000_000
    method = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    response = method(request, timeout=30)
    names = [o.name for o in response.outputs]
    assert names == list(OUTPUTS)
    assert len(response.raw_output_contents) == 3
    assert not response.outputs[0].contents.fp32_contents
    start = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 4)
    assert np.isfinite(start).all()
    channel.close()


def test_grpc_errors_have_codes(served: ServerThread) -> None:
    client = triton_grpc.InferenceServerClient(served.grpc)
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert "NOT_FOUND" in str(unknown.value.status())
    ids = np.zeros((1, 65), np.int64)
    with pytest.raises(InferenceServerException) as too_long:
        client.infer(MODEL, _inputs(triton_grpc, ids, None))
    assert "INVALID_ARGUMENT" in str(too_long.value.status())
    with pytest.raises(InferenceServerException) as unimplemented:
        client.get_model_repository_index()
    assert "UNIMPLEMENTED" in str(unimplemented.value.status())


def test_proto_schema_is_wire_compatible_with_triton() -> None:
    """Every field of our schema has tritonclient's number, type and cardinality."""

    def compare(ours: Any, theirs: Any, path: str) -> int:
        checked = 0
        for field in ours.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{path}.{field.name} missing in Triton's proto"
            assert (field.number, field.type, field.is_repeated) == (
                other.number,
                other.type,
                other.is_repeated,
            ), f"{path}.{field.name}"
            checked += 1
            if field.message_type is not None:
                assert field.message_type.name == other.message_type.name
                checked += compare(field.message_type, other.message_type, f"{path}.{field.name}")
        return checked

    total = 0
    for request, response in oip_proto.RPCS.values():
        for name in (request, response):
            ours = oip_proto.message_class(name).DESCRIPTOR
            total += compare(ours, service_pb2.DESCRIPTOR.message_types_by_name[name], name)
    assert total > 60
