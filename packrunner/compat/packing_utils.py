"""Graphcore's offline packer (``packing_utils.pack_data``) on top of :mod:`packrunner.packing`.

PopRT's ``packed_bert_example.py`` packs a dataset offline with ``packing_utils.pack_data`` and
runs the packed batches with a plain session, to compare against the online PackRunner. This
module reproduces that function's results (same batches, same tensors, same ``count``) with
packrunner's planner and feed builder::

    from packrunner.compat import packing_utils

    transfer = packing_utils.pack_data(datasets, index, 16, seq_len=256, max_valid_num=40,
                                       segment_num=1, across_rows=False)
    feeds = transfer.data            # [16, 256] int32 input_ids / position_ids / ... arrays
    index = transfer.count           # first sample of the next batch

Semantics (as Graphcore's implementation): greedy next fit in arrival order, starting at
``index``; the batch stops at ``max_valid_num`` samples or at the first sample the last row
cannot take. ``position_ids`` restart at 0 for every sample. ``attention_mask`` holds ``1 + k``
for the ``k``-th sample of the batch; in single-row mode it is renumbered to start at 1 in every
row (the segment ids a packed model expects). ``unpack_info[k, 0]`` is sample
``k``'s length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from packrunner.config import PackAlgorithm
from packrunner.packing import build_feeds, plan_batch

__all__ = [
    "INPUT_IDS",
    "INPUT_MASK",
    "POSITION_IDS",
    "SEGMENT_IDS",
    "DataSpec",
    "DataTransfer",
    "PackableSample",
    "create_input_data",
    "pack_data",
]

INPUT_IDS: Final = "input_ids"
POSITION_IDS: Final = "position_ids"
SEGMENT_IDS: Final = "token_type_ids"
INPUT_MASK: Final = "attention_mask"

Int32Array = npt.NDArray[np.int32]


class PackableSample(Protocol):
    """One unpadded sample, e.g. the ``BertInputs`` objects of Graphcore's example.

    Only these attributes are read; ``position_ids`` and ``unpack_info`` of the sample are
    ignored, as in Graphcore's implementation (positions are always ``0..len-1``).
    """

    @property
    def input_ids(self) -> npt.ArrayLike:
        """Token ids, ``input_len`` of them."""

    @property
    def attention_mask(self) -> npt.ArrayLike:
        """Ones, ``input_len`` of them (an unpadded sample)."""

    @property
    def token_type_ids(self) -> npt.ArrayLike:
        """Token type ids, ``input_len`` of them."""

    @property
    def input_len(self) -> int:
        """The sample's length."""


class DataSpec:
    """Where one packed sample ended up (Graphcore's ``DataSpec``).

    Attributes:
        id: The sample's index in the dataset.
        row: The row holding the sample's last token.
        col: One past the sample's last token in that row (Graphcore records the position
            *after* insertion, so this is where the next sample would start in that row).
        l: The sample's length.
    """

    __slots__ = ("col", "flush", "id", "l", "positions", "row", "sender")

    def __init__(
        self,
        id: int,
        row: int,
        col: int,
        l: int,  # noqa: E741 - Graphcore's attribute name, kept for drop-in use
        positions: npt.NDArray[np.int64] | None = None,
        flush: bool = False,
        sender: int = 0,
    ) -> None:
        self.id = id
        self.row = row
        self.col = col
        self.l = l
        self.positions = positions
        self.flush = flush
        self.sender = sender

    def shift(self, row_offset: int) -> DataSpec:
        """The same spec with ``row`` moved up by ``row_offset``."""
        return DataSpec(self.id, self.row - row_offset, self.col, self.l)

    def debug(self) -> str:
        """``id,row,col,l``."""
        return f"{self.id},{self.row},{self.col},{self.l}"

    def __repr__(self) -> str:
        return self.debug()

    __str__ = __repr__


class DataTransfer:
    """One packed batch (Graphcore's ``DataTransfer``).

    Attributes:
        count: Index of the first sample *not* in this batch (pass it as the next ``index``).
        specs: One :class:`DataSpec` per packed sample, in order; ``len(specs)`` samples.
        data: ``input_ids``, ``position_ids``, ``token_type_ids``, ``attention_mask``, each
            ``[batch_size, seq_len]`` int32.
        unpack_info: ``[max_valid_num, segment_num]`` int32; ``[k, 0]`` is sample ``k``'s
            length, the rest zeros. packrunner's unpack/repack models take ``[max_valid_num]``:
            ``backend`` sessions reshape a ``[max_valid_num, 1]`` feed to it.
        last: Unused (Graphcore's flag), always False.
    """

    __slots__ = ("count", "data", "last", "specs", "unpack_info")

    def __init__(
        self,
        count: int,
        spec: list[DataSpec],
        data: dict[str, Int32Array],
        unpack_info: Int32Array,
        last: bool = False,
    ) -> None:
        self.count = count
        self.specs = spec
        self.data = data
        self.unpack_info = unpack_info
        self.last = last


def create_input_data(bs: int, seq: int) -> dict[str, Int32Array]:
    """Zeroed ``[bs, seq]`` int32 arrays for the four packed inputs (Graphcore's helper)."""
    return {
        name: np.zeros((bs, seq), dtype=np.int32)
        for name in (INPUT_IDS, POSITION_IDS, SEGMENT_IDS, INPUT_MASK)
    }


def pack_data(
    datasets: Sequence[PackableSample],
    index: int,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    segment_num: int,
    across_rows: bool,
    zero_delimiter_num: int = 0,
) -> DataTransfer:
    """Pack the samples from ``datasets[index]`` on into one ``[batch_size, seq_len]`` batch.

    Args:
        datasets: The samples, in arrival order.
        index: First sample to pack.
        batch_size: Rows.
        seq_len: Tokens per row.
        max_valid_num: Most samples in the batch.
        segment_num: Columns of ``unpack_info``.
        across_rows: True lays samples end to end in the flattened batch (they may cross row
            boundaries; unpack/repack models); False keeps each sample within one row
            (packed models) and renumbers the mask per row.
        zero_delimiter_num: Zero tokens between samples of a row; only 0 is supported.

    Returns:
        The batch, with ``count`` the index of the next unpacked sample.

    Raises:
        ValueError: A size is out of range, or a sample's length is not in ``[1, seq_len]``,
            its arrays do not have ``input_len`` entries, or its attention mask is not ones.
        NotImplementedError: ``zero_delimiter_num`` is not 0.
    """
    if zero_delimiter_num != 0:
        raise NotImplementedError(
            f"zero_delimiter_num={zero_delimiter_num} (PopRT's DeBERTa delimiter packing) is not "
            "supported; packrunner packs samples back to back, use zero_delimiter_num=0"
        )
    for name, value, minimum in (
        ("index", index, 0),
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 1),
        ("max_valid_num", max_valid_num, 0),
        ("segment_num", segment_num, 1),
    ):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    candidates = datasets[index : index + max_valid_num]
    lengths = [_length(index + k, sample, seq_len) for k, sample in enumerate(candidates)]
    if across_rows:
        # packrunner's STREAM plan tops up the tail of a batch with later samples that fit;
        # Graphcore's packer is strictly in arrival order. So plan only the in-order prefix
        # that fits the flattened batch: STREAM then takes all of it, in order.
        fits = np.cumsum(lengths) <= batch_size * seq_len
        count = int(np.count_nonzero(fits))
        plan = plan_batch(
            lengths[:count],
            algorithm=PackAlgorithm.STREAM,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max(max_valid_num, 1),
            lookahead=max(count, 1),
        )
    else:
        # NEXT_FIT is exactly Graphcore's single-row rule: fill the row, then open the next;
        # stop at max_valid_num or when the last row cannot take the next sample.
        plan = plan_batch(
            lengths,
            algorithm=PackAlgorithm.NEXT_FIT,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max(max_valid_num, 1),
        )
    if plan.chosen != tuple(range(plan.num_samples)):  # pragma: no cover - planner invariant
        raise AssertionError(f"offline packing must keep arrival order, got {plan.chosen}")

    packed = candidates[: plan.num_samples]
    token_inputs: dict[str, list[Int32Array]] = {INPUT_IDS: [], SEGMENT_IDS: []}
    for k, sample in enumerate(packed):
        position, length = index + k, lengths[k]
        token_inputs[INPUT_IDS].append(_ids(position, sample.input_ids, INPUT_IDS, length))
        token_inputs[SEGMENT_IDS].append(_ids(position, sample.token_type_ids, SEGMENT_IDS, length))
        _check_mask(position, sample, length)
    if across_rows:
        # Across rows the mask keeps Graphcore's batch-wide numbering 1 + k (no per-row
        # renumbering), so it is placed like any per-token input.
        token_inputs[INPUT_MASK] = [
            np.full(length, k + 1, dtype=np.int32) for k, length in enumerate(plan.lengths)
        ]
    feeds = build_feeds(
        plan,
        token_inputs,
        batch_size=batch_size,
        seq_len=seq_len,
        position_input=POSITION_IDS,
        mask_input=None if across_rows else INPUT_MASK,
    )
    data = {name: feeds[name] for name in (INPUT_IDS, POSITION_IDS, SEGMENT_IDS, INPUT_MASK)}

    unpack_info = np.zeros((max_valid_num, segment_num), dtype=np.int32)
    unpack_info[: plan.num_samples, 0] = plan.lengths
    ends = plan.starts + plan.lengths
    rows = (ends - 1) // seq_len
    specs = [
        DataSpec(index + k, int(row), int(end - row * seq_len), int(length))
        for k, (row, end, length) in enumerate(zip(rows, ends, plan.lengths, strict=True))
    ]
    return DataTransfer(index + plan.num_samples, specs, data, unpack_info)


def _length(position: int, sample: PackableSample, seq_len: int) -> int:
    length = int(sample.input_len)
    if not 1 <= length <= seq_len:
        raise ValueError(f"sample {position} has input_len={length}; must be in [1, {seq_len}]")
    return length


def _ids(position: int, values: npt.ArrayLike, name: str, length: int) -> Int32Array:
    array = np.asarray(values)
    if array.shape != (length,) or array.dtype.kind not in "iu":
        raise ValueError(
            f"sample {position}: {name} must be {length} integers (input_len), got "
            f"{array.dtype} {array.shape}"
        )
    return array.astype(np.int32, copy=False)


def _check_mask(position: int, sample: PackableSample, length: int) -> None:
    # Graphcore adds k to the sample's own mask; only a mask of ones gives valid segment ids.
    mask = np.asarray(sample.attention_mask)
    if mask.shape != (length,) or not bool((mask == 1).all()):
        raise ValueError(
            f"sample {position}: attention_mask must be {length} ones (an unpadded sample)"
        )
