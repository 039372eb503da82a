"""OIP (KServe v2) REST inference bodies, with Triton's binary tensor data extension.

Request body: a JSON object, optionally followed by raw little-endian tensors. When binary data
is present, ``Inference-Header-Content-Length`` gives the JSON's length and each binary input
carries ``parameters.binary_data_size``; tensors follow in the order of ``inputs``. The body is
parsed here from raw bytes whatever the Content-Type (tritonclient sends none).

Response: JSON, or JSON plus binary tensors when the request asked for binary outputs
(``binary_data_output`` on the request, ``binary_data`` per requested output).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner.serve.errors import invalid

__all__ = [
    "HEADER_LENGTH",
    "V2Request",
    "encode_response",
    "parse_request",
    "tensor_from_bytes",
]

HEADER_LENGTH = "inference-header-content-length"

DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


@dataclass(frozen=True, slots=True)
class V2Request:
    """A decoded inference request.

    Attributes:
        id: The request id, echoed in the response.
        inputs: Input name -> (datatype, array of the declared shape).
        outputs: Requested output names with their ``binary_data`` choice (None: default);
            None when the request named no outputs.
        binary_default: ``binary_data_output``: outputs travel raw unless they say otherwise.
        timeout_us: ``parameters.timeout`` in microseconds.
    """

    id: str | None
    inputs: dict[str, tuple[str, npt.NDArray[Any]]]
    outputs: list[tuple[str, bool | None]] | None
    binary_default: bool
    timeout_us: int | None


def tensor_from_bytes(datatype: str, shape: list[int], raw: bytes, name: str) -> npt.NDArray[Any]:
    """A tensor from its raw little-endian bytes; the size must match the shape exactly."""
    dtype = DATATYPES[_datatype(datatype, name)]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"input {name!r}: {len(raw)} bytes of binary data, but shape {shape} of {datatype} "
            f"needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _datatype(value: object, name: str) -> str:
    if not isinstance(value, str) or value not in DATATYPES:
        raise invalid(f"input {name!r}: unsupported datatype {value!r}")
    return value


def _shape(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise invalid(f"input {name!r}: shape must be a list of non-negative ints, got {value!r}")
    return value


def parse_request(body: bytes, header_length: str | None) -> V2Request:
    """Decode a request body (JSON, optionally followed by binary tensors).

    Raises:
        ServeError: VALIDATION with a message saying what is malformed.
    """
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise invalid(
                f"Inference-Header-Content-Length {header_length!r} is not an integer"
            ) from None
        if not 0 < json_length <= len(body):
            raise invalid(
                f"Inference-Header-Content-Length {json_length} does not fit a body of "
                f"{len(body)} bytes"
            )
    else:
        json_length = len(body)
    try:
        document = json.loads(body[:json_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"malformed JSON in the inference request: {exc}") from None
    if not isinstance(document, dict):
        raise invalid("the inference request must be a JSON object")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid("'parameters' must be an object")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise invalid("'inputs' must be a non-empty list")
    binary = memoryview(body)[json_length:]
    offset = 0
    inputs: dict[str, tuple[str, npt.NDArray[Any]]] = {}
    for entry in raw_inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise invalid("each input must be an object with a 'name'")
        name = entry["name"]
        datatype = _datatype(entry.get("datatype"), name)
        shape = _shape(entry.get("shape"), name)
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise invalid(f"input {name!r}: binary_data_size must be a non-negative int")
            if offset + size > len(binary):
                raise invalid(
                    f"input {name!r}: binary data truncated ({len(binary) - offset} of "
                    f"{size} bytes present)"
                )
            array = tensor_from_bytes(datatype, shape, bytes(binary[offset : offset + size]), name)
            offset += size
        else:
            if "data" not in entry:
                raise invalid(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                array = np.asarray(entry["data"], dtype=DATATYPES[datatype]).reshape(shape)
            except (ValueError, TypeError, OverflowError) as exc:
                raise invalid(f"input {name!r}: data does not match shape {shape}: {exc}") from None
        if name in inputs:
            raise invalid(f"input {name!r} given twice")
        inputs[name] = (datatype, array)
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data not claimed by any input")
    outputs = None
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw_outputs
        ):
            raise invalid("'outputs' must be a list of objects with a 'name'")
        outputs = [(o["name"], (o.get("parameters") or {}).get("binary_data")) for o in raw_outputs]
    timeout = parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
        raise invalid(
            f"parameters.timeout must be a non-negative int (microseconds), got {timeout!r}"
        )
    request_id = document.get("id")
    return V2Request(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=outputs,
        binary_default=bool(parameters.get("binary_data_output", False)),
        timeout_us=timeout or None,
    )


def encode_response(
    model_name: str,
    request_id: str | None,
    outputs: Mapping[str, tuple[npt.NDArray[np.float32], bool]],
) -> tuple[bytes, int | None]:
    """The response body and, when binary tensors follow the JSON, the JSON's length."""
    described = []
    tails = []
    for name, (array, binary) in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "outputs": described}
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not tails:
        return header, None
    return b"".join([header, *tails]), len(header)
