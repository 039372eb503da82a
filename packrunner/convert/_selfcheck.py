"""The converter's own equivalence check: a conversion that does not pass it is refused.

Before :func:`~packrunner.convert.convert_to_packed` returns, the converted graph runs a few
random samples (lengths ``1 .. seq_len``, extremes included) packed the way the runner packs them
(:func:`packrunner.packing.plan_batch` / :func:`~packrunner.packing.build_feeds` /
:func:`~packrunner.packing.unpack_outputs`, the engine's own code), and the *original* export runs
each sample alone (batch 1, its own length, a mask of ones). Every output of every sample must
agree within ``tolerance * max(1, max |reference|)`` (the precision's: fp32 or fp16, see
:mod:`packrunner.convert._precision`); otherwise the conversion is wrong (a table
taken for another, positions shifted, a mask use left behind) and :class:`ConversionError` says
by how much.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from packrunner.config import InputForm
from packrunner.convert._match import OutputKind, output_layout
from packrunner.convert._match_positions import PositionKind, PositionLookup
from packrunner.convert._match_relative import RowInvariantPositions
from packrunner.convert._precision import FP32_TOLERANCE
from packrunner.devices.base import OutputSpec
from packrunner.errors import ConversionError
from packrunner.graphs import UNPACK_INFO, make_session
from packrunner.packing import build_feeds, plan_batch, unpack_outputs

__all__ = ["SelfCheck", "check_equivalence"]

_SEED = 20261202
_SHORT_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class SelfCheck:
    """What the self-check measured.

    Attributes:
        lengths: The sample lengths run.
        max_abs_diff: Largest |converted - original| over every output and valid token.
        bound: The tolerance it was held to.
    """

    lengths: tuple[int, ...]
    max_abs_diff: float
    bound: float


def check_lengths(seq_len: int) -> tuple[int, ...]:
    """A few lengths in ``1 .. seq_len``, both extremes included."""
    return tuple(
        sorted({1, 2, 3, seq_len // 2 + 1, seq_len - 1, seq_len} & set(range(1, seq_len + 1)))
    )


def check_equivalence(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    form: InputForm,
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    lookup: PositionLookup | RowInvariantPositions,
    vocab_size: int,
    outputs: Mapping[str, OutputKind],
    tolerance: float = FP32_TOLERANCE,
) -> SelfCheck:
    """Run ``converted`` packed against ``original`` per sample; refuse a mismatch.

    ``tolerance`` is relative to the largest reference magnitude of an output (at least 1).

    Raises:
        ConversionError: Some output differs by more than the tolerance.
    """
    rng = np.random.default_rng(_SEED)
    tokens = np.array([t for t in range(vocab_size) if t != lookup.pad_token])
    lengths = check_lengths(seq_len)
    if "sample" in outputs.values():
        # Per-sample heads are read per segment: fill rows with many short samples too, so that
        # segments far past the first are checked.
        lengths = (*lengths, *[1, 2, 3] * _SHORT_ROUNDS)
    samples = [rng.choice(tokens, size=n).astype(np.int64) for n in lengths]

    reference = make_session(original)
    ref_inputs = {i.name: (str(i.type), list(i.shape)) for i in reference.get_inputs()}
    references = [_run(reference, _single_feeds(ids, ref_inputs, lookup)) for ids in samples]

    session = make_session(converted)
    fed = {i.name for i in session.get_inputs()}
    unpack = form is InputForm.UNPACK_REPACK
    specs = {name: OutputSpec(name, output_layout(kind, form)) for name, kind in outputs.items()}
    worst, bound = 0.0, 0.0
    pending = list(range(len(samples)))
    while pending:
        plan = plan_batch(
            [lengths[i] for i in pending],
            algorithm=form.default_algorithm,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
        )
        chosen = [pending[k] for k in plan.chosen]
        token_inputs = {
            name: [_token_values(name, samples[i]) for i in chosen]
            for name in ("input_ids", "token_type_ids")
            if name in fed
        }
        feeds = build_feeds(
            plan,
            token_inputs,
            batch_size=batch_size,
            seq_len=seq_len,
            position_input="position_ids" if "position_ids" in fed else None,
            mask_input=None if unpack else "attention_mask",
            unpack_info_input=UNPACK_INFO if unpack else None,
            max_valid_num=max_valid_num,
            binary_mask=form is InputForm.PADDED,
        )
        results = unpack_outputs(plan, _run(session, feeds), specs, seq_len=seq_len)
        for slot, (index, result) in enumerate(zip(chosen, results, strict=True)):
            first_in_row = plan.segment_ids[slot] == 1
            for name, got in result.items():
                if outputs[name] == "row" and not first_in_row:
                    continue  # a per-row output describes the row's first sample only
                want = references[index][name][0]
                if outputs[name] == "token":
                    want = want[: lengths[index]]
                diff = np.abs(np.asarray(got, np.float64) - want)
                worst = max(worst, float(diff.max()))
                bound = max(bound, tolerance * max(1.0, float(np.abs(want).max())))
        pending = [i for i in pending if i not in chosen]
    if not worst <= bound:
        raise ConversionError(
            f"the converted graph does not reproduce the export: packed outputs differ from the "
            f"original run on each sample alone by up to {worst:.3g} (tolerance {bound:.3g}) "
            f"over lengths {list(lengths)}; refusing the conversion"
        )
    return SelfCheck(lengths, worst, bound)


def _token_values(name: str, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]:
    return (ids if name == "input_ids" else np.zeros_like(ids)).astype(np.int32)


def _single_feeds(
    ids: npt.NDArray[np.int64],
    inputs: Mapping[str, tuple[str, list[object]]],
    lookup: PositionLookup | RowInvariantPositions,
) -> dict[str, npt.NDArray[np.generic]]:
    """The original's feeds for one sample alone: batch 1, its own length.

    A static-shape original (e.g. a padded model built by :mod:`packrunner.models`) gets the
    sample in row 0, padded to its fixed length with a 0 mask; row 0 is then its result.
    """
    length = ids.shape[0]
    values = {
        "input_ids": ids,
        "attention_mask": np.ones(length, np.int64),
        "token_type_ids": np.zeros(length, np.int64),
        "position_ids": np.arange(length, dtype=np.int64)
        + (lookup.offset if lookup.kind is PositionKind.INPUT else 0),
    }
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for name, (kind, shape) in inputs.items():
        rows = shape[0] if len(shape) == 2 and isinstance(shape[0], int) else 1
        width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else length
        fill = lookup.pad_token if name == "input_ids" and lookup.pad_token is not None else 0
        tensor = np.full((rows, width), fill, np.int32 if "int32" in kind else np.int64)
        tensor[0, :length] = values[name]
        feeds[name] = tensor
    return feeds


def _run(
    session: ort.InferenceSession, feeds: Mapping[str, npt.NDArray[np.generic]]
) -> dict[str, npt.NDArray[np.generic]]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))
