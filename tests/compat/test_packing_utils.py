"""packrunner.compat.packing_utils.pack_data: Graphcore's offline packer semantics."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from packrunner.compat import packing_utils
from packrunner.compat.packing_utils import DataTransfer, pack_data

from ._support import Sample, make_samples

INPUTS = ("input_ids", "position_ids", "token_type_ids", "attention_mask")


def reference_pack(
    samples: list[Sample],
    index: int,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    across_rows: bool,
) -> tuple[int, dict[str, npt.NDArray[np.int32]], list[int], list[tuple[int, int]]]:
    """A token-by-token restatement of the semantics: (count, data, lengths, spec ends)."""
    data = {name: np.zeros((batch_size, seq_len), dtype=np.int32) for name in INPUTS}
    row, col, k = 0, 0, 0
    lengths: list[int] = []
    ends: list[tuple[int, int]] = []
    while index < len(samples) and k < max_valid_num:
        sample = samples[index]
        length = sample.input_len
        if row == batch_size - 1 and seq_len - col < length:
            break  # the last row cannot take it
        if not across_rows and seq_len - col < length:
            row, col = row + 1, 0  # single row: open the next row
        values: dict[str, npt.NDArray[Any]] = {
            "input_ids": np.asarray(sample.input_ids),
            "position_ids": np.arange(length),
            "token_type_ids": np.asarray(sample.token_type_ids),
            "attention_mask": np.full(length, k + 1),
        }
        for token in range(length):
            if col == seq_len:  # across rows: continue on the next row
                row, col = row + 1, 0
            for name in INPUTS:
                data[name][row, col] = values[name][token]
            col += 1
        ends.append((row, col))
        lengths.append(length)
        index += 1
        k += 1
    if not across_rows:  # renumber the mask so every row starts at segment 1
        mask = data["attention_mask"]
        for r in range(batch_size):
            first = mask[r, 0]
            mask[r] = np.where(mask[r] > 0, mask[r] - first + 1, 0)
    return index, data, lengths, ends


def assert_matches_reference(
    transfer: DataTransfer,
    samples: list[Sample],
    index: int,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    across_rows: bool,
) -> None:
    count, data, lengths, ends = reference_pack(
        samples, index, batch_size, seq_len, max_valid_num, across_rows
    )
    assert transfer.count == count
    assert list(transfer.data) == list(INPUTS)
    for name in INPUTS:
        assert transfer.data[name].dtype == np.int32
        np.testing.assert_array_equal(transfer.data[name], data[name], err_msg=name)
    assert transfer.unpack_info.dtype == np.int32
    expected_info = np.zeros_like(transfer.unpack_info)
    expected_info[: len(lengths), 0] = lengths
    np.testing.assert_array_equal(transfer.unpack_info, expected_info)
    assert [spec.id for spec in transfer.specs] == list(range(index, count))
    assert [spec.l for spec in transfer.specs] == lengths
    assert [(spec.row, spec.col) for spec in transfer.specs] == ends


def test_single_row_by_hand() -> None:
    samples = make_samples([3, 4, 2, 5, 1])
    transfer = pack_data(samples, 0, 2, seq_len=8, max_valid_num=10, segment_num=1,
                         across_rows=False)  # fmt: skip
    assert transfer.count == 5
    np.testing.assert_array_equal(
        transfer.data["attention_mask"], [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2, 3]]
    )
    np.testing.assert_array_equal(
        transfer.data["position_ids"], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0]]
    )
    np.testing.assert_array_equal(transfer.data["input_ids"][0, 3:7], samples[1].input_ids)
    np.testing.assert_array_equal(transfer.data["token_type_ids"][1, 7:], samples[4].token_type_ids)
    assert transfer.unpack_info.shape == (10, 1)
    assert transfer.unpack_info[:, 0].tolist() == [3, 4, 2, 5, 1, 0, 0, 0, 0, 0]
    # Graphcore records where each sample *ends* (row, one past its last column).
    assert [(s.id, s.row, s.col, s.l) for s in transfer.specs] == [
        (0, 0, 3, 3),
        (1, 0, 7, 4),
        (2, 1, 2, 2),
        (3, 1, 7, 5),
        (4, 1, 8, 1),
    ]
    assert str(transfer.specs[3]) == "3,1,7,5"


def test_across_rows_by_hand() -> None:
    samples = make_samples([5, 5, 5, 5])
    transfer = pack_data(samples, 0, 2, 8, 10, 1, True)
    assert transfer.count == 3  # 5 + 5 + 5 = 15 of 16 tokens; the fourth does not fit
    # Across rows the mask keeps the batch-wide numbering 1 + k.
    np.testing.assert_array_equal(
        transfer.data["attention_mask"], [[1, 1, 1, 1, 1, 2, 2, 2], [2, 2, 3, 3, 3, 3, 3, 0]]
    )
    np.testing.assert_array_equal(
        transfer.data["position_ids"], [[0, 1, 2, 3, 4, 0, 1, 2], [3, 4, 0, 1, 2, 3, 4, 0]]
    )
    np.testing.assert_array_equal(
        np.concatenate([transfer.data["input_ids"][0, 5:], transfer.data["input_ids"][1, :2]]),
        samples[1].input_ids,
    )
    assert [(s.row, s.col) for s in transfer.specs] == [(0, 5), (1, 2), (1, 7)]


def test_across_rows_keeps_arrival_order() -> None:
    # packrunner's online STREAM plan would top the batch up with the 4-token sample; the
    # offline packer must stop at the first sample that does not fit.
    samples = make_samples([12, 12, 12, 4])
    transfer = pack_data(samples, 0, 2, 16, 10, 1, True)
    assert transfer.count == 2
    assert transfer.unpack_info[:3, 0].tolist() == [12, 12, 0]
    assert [s.id for s in transfer.specs] == [0, 1]


def test_stops_at_max_valid_num() -> None:
    samples = make_samples([1] * 10)
    for across_rows in (False, True):
        transfer = pack_data(samples, 2, 2, 8, 3, 1, across_rows)
        assert transfer.count == 5
        assert transfer.unpack_info.shape == (3, 1)
        assert transfer.unpack_info[:, 0].tolist() == [1, 1, 1]


def test_single_row_stops_when_the_last_row_is_full() -> None:
    samples = make_samples([6, 6, 6, 1])
    transfer = pack_data(samples, 0, 2, 8, 10, 1, False)
    assert transfer.count == 2  # rows [6], [6]: the third 6 fits in neither
    transfer = pack_data(samples, 2, 2, 8, 10, 1, False)
    assert transfer.count == 4  # [6, 1] in row 0


@pytest.mark.parametrize("across_rows", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_over_a_dataset(across_rows: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch_size, seq_len = int(rng.integers(1, 5)), int(rng.integers(4, 33))
    max_valid_num = int(rng.integers(1, 12))
    lengths = np.clip(rng.normal(seq_len / 2, seq_len / 2, 200).astype(int), 1, seq_len)
    samples = make_samples([int(n) for n in lengths], seed=seed)
    index, batches = 0, 0
    while index < len(samples):
        transfer = pack_data(
            samples, index, batch_size, seq_len, max_valid_num, segment_num=2,
            across_rows=across_rows,
        )  # fmt: skip
        assert_matches_reference(
            transfer, samples, index, batch_size, seq_len, max_valid_num, across_rows
        )
        assert transfer.unpack_info.shape == (max_valid_num, 2)
        assert not transfer.unpack_info[:, 1].any()
        assert transfer.count > index
        index = transfer.count
        batches += 1
    assert batches > 1
    empty = pack_data(samples, len(samples), batch_size, seq_len, max_valid_num, 1, across_rows)
    assert empty.count == len(samples) and not empty.specs
    assert not any(array.any() for array in empty.data.values())


def test_rejects_what_it_cannot_pack() -> None:
    samples = make_samples([3, 4])
    with pytest.raises(NotImplementedError, match="zero_delimiter_num=1"):
        pack_data(samples, 0, 2, 8, 10, 1, False, zero_delimiter_num=1)
    with pytest.raises(ValueError, match="input_len=9"):
        pack_data(make_samples([9]), 0, 2, 8, 10, 1, False)
    bad_mask: list[Any] = make_samples([3])
    bad_mask[0].attention_mask = np.array([1, 1, 0], dtype=np.int32)
    with pytest.raises(ValueError, match="attention_mask"):
        pack_data(bad_mask, 0, 2, 8, 10, 1, False)
    short: list[Any] = make_samples([3])
    short[0].token_type_ids = np.zeros(2, dtype=np.int32)
    with pytest.raises(ValueError, match="token_type_ids"):
        pack_data(short, 0, 2, 8, 10, 1, False)
    with pytest.raises(ValueError, match="segment_num"):
        pack_data(samples, 0, 2, 8, 10, 0, False)


def test_helpers_match_graphcores() -> None:
    data = packing_utils.create_input_data(3, 5)
    assert list(data) == list(INPUTS)
    assert all(array.shape == (3, 5) and array.dtype == np.int32 for array in data.values())
    spec = packing_utils.DataSpec(4, 2, 3, 7)
    assert spec.shift(1).row == 1 and spec.debug() == "4,2,3,7"
