"""Helpers of the converter tests: fixture paths, sessions, per-sample comparisons.

Samples and the reference packers come from :mod:`tests._support` (numpy only, independent of
the engine's packer: these tests check the converter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from tests._support import Placement, Sample, pack_stream

FloatArray = npt.NDArray[np.float32]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

#: Measured max abs differences, by test, printed in the terminal summary (see conftest.py).
MEASURED_DIFFS = pytest.StashKey[dict[str, float]]()


def record_diff(request: pytest.FixtureRequest, value: float, label: str = "") -> None:
    """Remember a measured difference for the end-of-run summary."""
    diffs = request.config.stash.setdefault(MEASURED_DIFFS, {})
    diffs[f"{request.node.nodeid}{label}"] = value


def fixture_path(name: str) -> Path:
    """Path of a committed fixture model, e.g. ``fixture_path("tiny_hf_bert_qa")``."""
    return FIXTURES / f"{name}.onnx"


def make_session(model: bytes | str | Path) -> ort.InferenceSession:
    """A CPU onnxruntime session sized for this project's 2-core machines."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(
    session: ort.InferenceSession, feeds: Mapping[str, npt.NDArray[np.generic]]
) -> dict[str, FloatArray]:
    """Run a session on all its outputs, returned by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def stream_pack(
    samples: Sequence[Sample], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[dict[str, npt.NDArray[np.int32]], list[Placement]]:
    """:func:`tests._support.pack_stream`, with placements per output *slot*: slot ``k`` of a
    stream model's outputs holds sample ``k`` from position 0."""
    feeds, _ = pack_stream(samples, batch_size, seq_len, max_valid_num)
    return feeds, [Placement(slot, 0, s.length, 0) for slot, s in enumerate(samples)]


def fill_lengths(rng: np.random.Generator, capacity: int, seq_len: int) -> list[int]:
    """Lengths in 1..seq_len, including both extremes, that first-fit into ``capacity`` rows."""
    lengths = [seq_len, 1, seq_len - 1, 2]
    fill = [0] * capacity

    def place(n: int) -> bool:
        for r in range(capacity):
            if fill[r] + n <= seq_len:
                fill[r] += n
                return True
        return False

    for n in lengths:
        assert place(n)
    misses = 0
    while misses < 20:
        n = int(rng.integers(1, seq_len + 1)) if rng.random() < 0.5 else int(rng.integers(1, 40))
        if place(n):
            lengths.append(n)
        else:
            misses += 1
    return lengths


def run_single(
    session: ort.InferenceSession, sample: Sample, *, position_offset: int = 0
) -> dict[str, FloatArray]:
    """Run the unconverted export on one sample alone: batch 1, its own length, mask of ones.

    Only the inputs the export takes are fed; an export with a ``position_ids`` input gets
    ``position_offset + 0 .. L-1`` (RoBERTa family: ``padding_idx + 1 ...``).
    """
    # Hugging Face exports take int64 ids.
    values: dict[str, npt.NDArray[Any]] = {
        "input_ids": sample.input_ids[None, :].astype(np.int64),
        "attention_mask": np.ones((1, sample.length), dtype=np.int64),
        "token_type_ids": sample.token_type_ids[None, :].astype(np.int64),
        "position_ids": position_offset + np.arange(sample.length, dtype=np.int64)[None, :],
    }
    taken = {i.name for i in session.get_inputs()}
    return run(session, {name: value for name, value in values.items() if name in taken})


def per_sample_max_diff(
    packed: Mapping[str, FloatArray],
    placements: Sequence[Placement],
    references: Sequence[Mapping[str, FloatArray]],
) -> float:
    """Largest |packed - reference| over every sample's valid tokens and every packed output.

    Per-sample outputs (a converted per-sequence head) are read at the sample's segment
    (``[B, K, ...]``) or stream slot (``[M, ...]``); per-token ones at its tokens.
    """
    worst = 0.0
    for place, ref in zip(placements, references, strict=True):
        for name, out in packed.items():
            want = ref[name][0]  # the sample alone: its own length
            if out.ndim == want.ndim + 2:
                got = out[place.row, place.segment - 1]
            elif out.shape[1:] == want.shape:  # a slot (or a whole row) is the sample
                got = out[place.row]
            else:
                got = out[place.row, place.offset : place.offset + place.length]
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    return worst
