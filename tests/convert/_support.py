"""Helpers of the converter tests: fixture paths, sessions, and a small reference packer.

The packer packs samples into a fixed [rows, seq_len] batch the way packrunner feeds a converted
model. It is self-contained on purpose (numpy only): these tests check the converter, so they must
not depend on the engine's packer, which is written and tested separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

IntArray = npt.NDArray[np.int64]
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


@dataclass(frozen=True)
class Sample:
    """One unpadded sample: its token ids and token type ids (same length)."""

    input_ids: IntArray
    token_type_ids: IntArray

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Placement:
    """Where a sample landed: row, first token, length."""

    row: int
    offset: int
    length: int


def random_samples(
    rng: np.random.Generator, lengths: Sequence[int], vocab_size: int
) -> list[Sample]:
    """Samples of the given lengths with random token ids < vocab_size and random 0/1 types."""
    return [
        Sample(
            input_ids=rng.integers(0, vocab_size, size=n, dtype=np.int64),
            token_type_ids=rng.integers(0, 2, size=n, dtype=np.int64),
        )
        for n in lengths
    ]


def pack(
    samples: Sequence[Sample], batch_size: int, seq_len: int, *, rows_used: int | None = None
) -> tuple[dict[str, npt.NDArray[np.int32]], list[Placement]]:
    """First-fit the samples into rows; segment ids 1..k per row, positions restart at 0.

    Args:
        samples: The samples, each at most ``seq_len`` long.
        batch_size: Rows of the batch.
        seq_len: Tokens per row.
        rows_used: Pack only into the first this-many rows (the rest stay all padding).

    Returns:
        The int32 feeds and, per sample in order, where it was placed.

    Raises:
        ValueError: A sample does not fit anywhere.
    """
    limit = batch_size if rows_used is None else rows_used
    feeds = {
        name: np.zeros((batch_size, seq_len), dtype=np.int32)
        for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    }
    fill = [0] * batch_size
    segments = [0] * batch_size
    placements: list[Placement] = []
    for sample in samples:
        row = next((r for r in range(limit) if fill[r] + sample.length <= seq_len), None)
        if row is None:
            raise ValueError(f"sample of length {sample.length} does not fit")
        start, end = fill[row], fill[row] + sample.length
        segments[row] += 1
        feeds["input_ids"][row, start:end] = sample.input_ids
        feeds["token_type_ids"][row, start:end] = sample.token_type_ids
        feeds["attention_mask"][row, start:end] = segments[row]
        feeds["position_ids"][row, start:end] = np.arange(sample.length)
        fill[row] = end
        placements.append(Placement(row, start, sample.length))
    return feeds, placements


def stream_pack(
    samples: Sequence[Sample], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[dict[str, npt.NDArray[np.int32]], list[Placement]]:
    """Lay samples back to back in the flattened token stream (stream / unpack-repack mode).

    Samples cross row boundaries freely; ``unpack_info`` lists their lengths. The returned
    placements are per sample *slot*: output slot ``k`` holds sample ``k`` from position 0.
    """
    total = sum(s.length for s in samples)
    if total > batch_size * seq_len or len(samples) > max_valid_num:
        raise ValueError("samples do not fit the stream")
    flat = {
        name: np.zeros(batch_size * seq_len, dtype=np.int32)
        for name in ("input_ids", "token_type_ids", "position_ids")
    }
    info = np.zeros(max_valid_num, dtype=np.int32)
    start = 0
    for slot, sample in enumerate(samples):
        end = start + sample.length
        flat["input_ids"][start:end] = sample.input_ids
        flat["token_type_ids"][start:end] = sample.token_type_ids
        flat["position_ids"][start:end] = np.arange(sample.length)
        info[slot] = sample.length
        start = end
    feeds: dict[str, npt.NDArray[np.int32]] = {
        name: v.reshape(batch_size, seq_len) for name, v in flat.items()
    }
    feeds["unpack_info"] = info
    return feeds, [Placement(slot, 0, s.length) for slot, s in enumerate(samples)]


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
    values = {
        "input_ids": sample.input_ids[None, :],
        "attention_mask": np.ones((1, sample.length), dtype=np.int64),
        "token_type_ids": sample.token_type_ids[None, :],
        "position_ids": position_offset + np.arange(sample.length, dtype=np.int64)[None, :],
    }
    taken = {i.name for i in session.get_inputs()}
    return run(session, {name: value for name, value in values.items() if name in taken})


def per_sample_max_diff(
    packed: Mapping[str, FloatArray],
    placements: Sequence[Placement],
    references: Sequence[Mapping[str, FloatArray]],
) -> float:
    """Largest |packed - reference| over every sample's valid tokens and every packed output."""
    worst = 0.0
    for place, ref in zip(placements, references, strict=True):
        for name, out in packed.items():
            got = out[place.row, place.offset : place.offset + place.length]
            want = ref[name][0, : place.length]
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    return worst
