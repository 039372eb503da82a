"""Small, deliberately naive packers for the model tests.

They are independent of the engine's packer on purpose: the tests check the graphs against
layouts written out by hand, so a packer bug elsewhere cannot hide a graph bug here (or the
reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int32]
Feeds = dict[str, IntArray]


@dataclass(frozen=True)
class Sample:
    """One unpadded input sequence."""

    input_ids: IntArray
    token_type_ids: IntArray

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class RowPlacement:
    """Where a sample sits in a single-row packed batch."""

    row: int
    start: int
    segment: int  # 1-based segment id within the row


def random_samples(
    rng: np.random.Generator, lengths: Sequence[int], vocab_size: int, type_vocab_size: int = 2
) -> list[Sample]:
    """Random token ids; token types switch from 0 to 1 at a random point, like a text pair."""
    samples = []
    for length in lengths:
        if length == 0:  # a zero-length slot for the stream packer
            empty = np.zeros(0, dtype=np.int32)
            samples.append(Sample(empty, empty))
            continue
        ids = rng.integers(0, vocab_size, size=length).astype(np.int32)
        split = int(rng.integers(1, length + 1))
        types = (np.arange(length) >= split).astype(np.int32) % type_vocab_size
        samples.append(Sample(ids, types.astype(np.int32)))
    return samples


def pack_rows(
    rows: Sequence[Sequence[Sample]], batch_size: int, seq_len: int
) -> tuple[Feeds, list[RowPlacement]]:
    """Single-row packing: row ``r`` holds ``rows[r]`` back to back, segment ids 1, 2, ...

    Returns:
        Feeds for the ``"packed"`` graph and, per sample in row-major order, its placement.
    """
    assert len(rows) <= batch_size
    shape = (batch_size, seq_len)
    feeds: Feeds = {
        name: np.zeros(shape, dtype=np.int32)
        for name in ("input_ids", "token_type_ids", "position_ids", "attention_mask")
    }
    placements = []
    for r, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row, start=1):
            end = start + sample.length
            assert end <= seq_len, f"row {r} overflows"
            feeds["input_ids"][r, start:end] = sample.input_ids
            feeds["token_type_ids"][r, start:end] = sample.token_type_ids
            feeds["position_ids"][r, start:end] = np.arange(sample.length)
            feeds["attention_mask"][r, start:end] = segment
            placements.append(RowPlacement(r, start, segment))
            start = end
    return feeds, placements


def pack_padded(samples: Sequence[Sample], batch_size: int, seq_len: int) -> Feeds:
    """The classic layout: sample ``i`` alone in row ``i``, 0/1 attention mask."""
    assert len(samples) <= batch_size
    shape = (batch_size, seq_len)
    feeds: Feeds = {
        name: np.zeros(shape, dtype=np.int32)
        for name in ("input_ids", "token_type_ids", "attention_mask")
    }
    for r, sample in enumerate(samples):
        feeds["input_ids"][r, : sample.length] = sample.input_ids
        feeds["token_type_ids"][r, : sample.length] = sample.token_type_ids
        feeds["attention_mask"][r, : sample.length] = 1
    return feeds


def pack_stream(
    samples: Sequence[Sample], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[Feeds, list[int]]:
    """Across-rows packing: samples back to back in the flattened ``batch_size * seq_len`` stream.

    ``samples`` fills the ``unpack_info`` slots in order (an empty sample is a zero-length slot),
    the rest of the slots are 0.

    Returns:
        Feeds for the ``"unpack_repack"`` graph and each sample's stream start.
    """
    assert len(samples) <= max_valid_num
    total = batch_size * seq_len
    flat = {name: np.zeros(total, dtype=np.int32) for name in ("ids", "types", "positions")}
    unpack_info = np.zeros(max_valid_num, dtype=np.int32)
    starts = []
    cursor = 0
    for slot, sample in enumerate(samples):
        end = cursor + sample.length
        assert end <= total, "stream overflows"
        flat["ids"][cursor:end] = sample.input_ids
        flat["types"][cursor:end] = sample.token_type_ids
        flat["positions"][cursor:end] = np.arange(sample.length)
        unpack_info[slot] = sample.length
        starts.append(cursor)
        cursor = end
    shape = (batch_size, seq_len)
    feeds: Feeds = {
        "input_ids": flat["ids"].reshape(shape),
        "token_type_ids": flat["types"].reshape(shape),
        "position_ids": flat["positions"].reshape(shape),
        "unpack_info": unpack_info,
    }
    return feeds, starts
