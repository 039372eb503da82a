"""Per-request tensors <-> the runner's per-sequence samples, shared by OIP REST and gRPC.

A request carries one sequence (``input_ids`` ``[L]`` or ``[1, L]``) or several (``[N, Lmax]``
right-padded, with a 0/1 ``attention_mask``, the Hugging Face convention). Each row becomes one
sample of its own length; outputs come back per row and are laid out again as ``[N, Lmax, ...]``
(per-token outputs, zero past each row's length) or ``[N, ...]`` (per-sequence outputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner.runner import Result
from packrunner.serve.errors import ErrorKind, ServeError
from packrunner.serve.model import ServedModel, per_token

__all__ = [
    "INPUTS",
    "TensorMeta",
    "assemble_outputs",
    "check_outputs",
    "model_tensors",
    "split_sequences",
]

IDS, MASK, TYPES = "input_ids", "attention_mask", "token_type_ids"
#: The per-sequence inputs a request may carry.
INPUTS = (IDS, MASK, TYPES)
_INTEGER_DATATYPES = ("INT32", "INT64")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One tensor of the model metadata: name, OIP datatype, shape with -1 for variable dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def model_tensors(model: ServedModel) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """The per-request inputs and outputs a client sees (not the packed batch)."""
    inputs = [TensorMeta(name, "INT64", (-1, -1)) for name in INPUTS]
    outputs = []
    for name, spec in model.outputs.items():
        lead = (-1, -1) if per_token(spec) else (-1,)
        outputs.append(TensorMeta(name, "FP32", (*lead, *spec.trailing_shape)))
    return inputs, outputs


def split_sequences(
    tensors: Mapping[str, tuple[str, npt.NDArray[Any]]],
    *,
    max_sequences: int,
    max_length: int,
) -> tuple[list[dict[str, npt.NDArray[np.int32]]], int]:
    """The samples of a request, and its padded width ``Lmax``.

    Args:
        tensors: Input name -> (OIP datatype, array).
        max_sequences: ``--max-client-batch-size``.
        max_length: ``--max-input-length``.

    Raises:
        ServeError: VALIDATION for unknown inputs, wrong datatypes or shapes, a bad mask, an
            empty or over-long sequence; TOO_MANY_SEQUENCES past ``max_sequences``.
    """
    unknown = sorted(set(tensors) - set(INPUTS))
    if unknown:
        raise ServeError(ErrorKind.VALIDATION, f"unknown input(s) {unknown}; expected {INPUTS}")
    if IDS not in tensors:
        raise ServeError(ErrorKind.VALIDATION, f"missing required input {IDS!r}")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, (datatype, array) in tensors.items():
        if datatype not in _INTEGER_DATATYPES:
            raise ServeError(
                ErrorKind.VALIDATION,
                f"input {name!r} has datatype {datatype}; expected one of {_INTEGER_DATATYPES}",
            )
        if array.ndim == 1:
            array = array[np.newaxis, :]
        if array.ndim != 2:
            raise ServeError(
                ErrorKind.VALIDATION,
                f"input {name!r} has shape {list(array.shape)}; expected [L] or [N, L]",
            )
        arrays[name] = array
    ids = arrays[IDS]
    count, width = ids.shape
    for name, array in arrays.items():
        if array.shape != ids.shape:
            raise ServeError(
                ErrorKind.VALIDATION,
                f"input {name!r} has shape {list(array.shape)} but {IDS!r} has {list(ids.shape)}",
            )
    if count == 0 or width == 0:
        raise ServeError(ErrorKind.EMPTY, f"{IDS!r} is empty (shape {list(ids.shape)})")
    if count > max_sequences:
        raise ServeError(
            ErrorKind.TOO_MANY_SEQUENCES,
            f"{count} sequences in one request, more than max_client_batch_size={max_sequences}",
        )
    if MASK in arrays:
        mask = arrays[MASK]
        if not np.isin(mask, (0, 1)).all():
            raise ServeError(ErrorKind.VALIDATION, f"{MASK!r} must hold only 0 and 1")
        lengths = mask.sum(axis=1)
        # Right padding: every row is ones then zeros.
        if (mask != (np.arange(width) < lengths[:, None])).any():
            raise ServeError(
                ErrorKind.VALIDATION, f"{MASK!r} must be right-padded (ones, then zeros)"
            )
    else:
        lengths = np.full(count, width)
    if (lengths == 0).any():
        raise ServeError(ErrorKind.EMPTY, f"sequence {int(np.argmin(lengths))} has no tokens")
    if int(lengths.max()) > max_length:
        raise ServeError(
            ErrorKind.VALIDATION,
            f"sequence of {int(lengths.max())} tokens, more than max_input_length={max_length}",
        )
    samples = []
    for row, length in enumerate(lengths.tolist()):
        sample = {IDS: ids[row, :length]}
        if TYPES in arrays:
            sample[TYPES] = arrays[TYPES][row, :length]
        samples.append(sample)
    return samples, width


def assemble_outputs(
    model: ServedModel, results: Sequence[Result], names: Sequence[str], width: int
) -> dict[str, npt.NDArray[np.float32]]:
    """Stack per-sequence results into ``[N, width, ...]`` / ``[N, ...]`` float32 tensors."""
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name in names:
        spec = model.outputs[name]
        if per_token(spec):
            first = results[0][name]
            tensor = np.zeros((len(results), width, *first.shape[1:]), np.float32)
            for row, result in enumerate(results):
                value = result[name]
                tensor[row, : len(value)] = value
        else:
            tensor = np.stack([np.asarray(r[name], np.float32) for r in results])
        out[name] = tensor
    return out


def check_outputs(model: ServedModel, requested: Sequence[str] | None) -> list[str]:
    """The outputs to return (all when none are named).

    Raises:
        ServeError: VALIDATION for an output the model does not have.
    """
    if not requested:
        return list(model.outputs)
    unknown = [name for name in requested if name not in model.outputs]
    if unknown:
        raise ServeError(
            ErrorKind.VALIDATION,
            f"unknown output(s) {unknown}; the model has {list(model.outputs)}",
        )
    return list(requested)
