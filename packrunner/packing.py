"""Packing and unpacking: pure numpy, no asyncio, no device.

Two steps, both usable on their own (tests and offline tools call them directly):

1. :func:`plan_batch` decides *where* samples go: given the lengths of the queued samples, oldest
   first, it returns a :class:`PackPlan` naming which samples enter the next batch and at which
   offset of the flattened ``batch_size * seq_len`` token stream each one starts.
2. :func:`build_feeds` turns a plan plus the samples' token arrays into the fixed ``[batch_size,
   seq_len]`` int32 tensors (``input_ids``, ``token_type_ids``, ``position_ids`` restarting at 0
   for every sample, ``attention_mask`` holding segment ids 1..k per row and 0 on padding, and
   ``unpack_info`` for across-rows models); :func:`unpack_outputs` cuts device outputs back into
   one result per sample.

Both feeds and outputs are handled with a constant number of numpy calls per batch (no
per-sample Python loop over tokens): per-sample Python is what costs on the host.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from packrunner.config import PackAlgorithm
from packrunner.devices.base import OutputLayout, OutputSpec

__all__ = [
    "PackPlan",
    "build_feeds",
    "drain_queue",
    "pack_offline",
    "plan_batch",
    "unpack_outputs",
]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PackPlan:
    """Where the samples of one batch go.

    Attributes:
        chosen: Indices (into the candidate list given to :func:`plan_batch`) of the samples in
            this batch, in *slot order*: slot ``k`` is the ``k``-th sample of the token stream
            (row-major), which is the order of ``unpack_info`` and of per-sample outputs.
        lengths: Length of each chosen sample, in slot order.
        starts: Offset of each chosen sample in the flattened ``batch_size * seq_len`` stream.
        segment_ids: Attention-mask value of each chosen sample (1..k within its row; for
            across-rows plans, 1..k within the row where the sample starts).
        full: True when the batch can take no more samples (rows or ``max_valid_num`` used up,
            or a queued sample was left out for lack of room); False when it ran out of
            candidates and more arrivals could still join.
        shape: ``(rows, width)`` of this batch when the planner chose it (a device with several
            shapes, see :mod:`packrunner.shaping`); ``starts`` are then offsets in its
            ``rows * width`` stream. None: the runner config's ``[batch_size, seq_len]``.
    """

    chosen: tuple[int, ...]
    lengths: IntArray
    starts: IntArray
    segment_ids: IntArray
    full: bool
    shape: tuple[int, int] | None = None

    @property
    def num_samples(self) -> int:
        """Samples in the batch."""
        return len(self.chosen)

    @property
    def num_tokens(self) -> int:
        """Valid (non-padding) tokens in the batch."""
        return int(self.lengths.sum())


def plan_batch(
    lengths: Sequence[int],
    *,
    algorithm: PackAlgorithm,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    lookahead: int = 256,
) -> PackPlan:
    """Choose the samples of the next batch and their places.

    Args:
        lengths: Lengths of the queued samples, oldest first. Every length must be in
            ``[1, seq_len]`` (the runner checks this at submit time).
        algorithm: The placement rule, see :class:`~packrunner.PackAlgorithm`.
        batch_size: Rows of the batch.
        seq_len: Tokens per row.
        max_valid_num: Most samples in the batch.
        lookahead: How many of the oldest candidates ``LOOKAHEAD`` and ``STREAM`` consider.

    Returns:
        The plan. At least one sample is chosen whenever ``lengths`` is not empty.
    """
    if algorithm is PackAlgorithm.PADDED:
        placements, full = _padded(lengths, batch_size, max_valid_num)
    elif algorithm is PackAlgorithm.NEXT_FIT:
        placements, full = _next_fit(lengths, batch_size, seq_len, max_valid_num)
    elif algorithm is PackAlgorithm.FIRST_FIT:
        placements, full = _first_fit(lengths, batch_size, seq_len, max_valid_num)
    elif algorithm is PackAlgorithm.LOOKAHEAD:
        placements, full = _lookahead(lengths, batch_size, seq_len, max_valid_num, lookahead)
    elif algorithm is PackAlgorithm.STREAM:
        return _stream(lengths, batch_size, seq_len, max_valid_num, lookahead)
    else:  # pragma: no cover - exhaustive over the enum
        raise AssertionError(f"unknown algorithm {algorithm!r}")
    return _plan_from_rows(lengths, placements, seq_len, full)


# Each row-based algorithm returns placements as (candidate index, row, offset in row).
_Placement = tuple[int, int, int]


def _padded(
    lengths: Sequence[int], batch_size: int, max_valid_num: int
) -> tuple[list[_Placement], bool]:
    limit = min(batch_size, max_valid_num)
    count = min(limit, len(lengths))
    return [(i, i, 0) for i in range(count)], count == limit


def _next_fit(
    lengths: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[list[_Placement], bool]:
    placements: list[_Placement] = []
    row, used = 0, 0
    for index, length in enumerate(lengths):
        if len(placements) == max_valid_num:
            return placements, True
        if used + length > seq_len:
            row, used = row + 1, 0
            if row == batch_size:
                return placements, True
        placements.append((index, row, used))
        used += length
    full = len(placements) == max_valid_num or (row == batch_size - 1 and used == seq_len)
    return placements, full


def _first_fit(
    lengths: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[list[_Placement], bool]:
    placements: list[_Placement] = []
    used = [0] * batch_size
    for index, length in enumerate(lengths):
        if len(placements) == max_valid_num:
            return placements, True
        for row in range(batch_size):
            if used[row] + length <= seq_len:
                placements.append((index, row, used[row]))
                used[row] += length
                break
        else:
            return placements, True  # PopRT: the first sample that fits nowhere closes the batch
    full = len(placements) == max_valid_num or sum(used) == batch_size * seq_len
    return placements, full


class _LengthIndex:
    """The unplaced candidates of a window, grouped by length, for "largest that fits" queries.

    Within one length the oldest candidate is handed out first, so ties never starve anyone.
    """

    def __init__(self, lengths: Sequence[int]) -> None:
        self._by_length: dict[int, list[int]] = {}
        for index in range(len(lengths) - 1, -1, -1):  # reversed: pop() yields the oldest
            self._by_length.setdefault(lengths[index], []).append(index)
        self._sorted = sorted(self._by_length)

    def remove(self, index: int, length: int) -> None:
        bucket = self._by_length[length]
        bucket.remove(index)
        if not bucket:
            self._drop(length)

    def pop_largest_fitting(self, room: int) -> tuple[int, int] | None:
        position = bisect.bisect_right(self._sorted, room)
        if position == 0:
            return None
        length = self._sorted[position - 1]
        bucket = self._by_length[length]
        index = bucket.pop()
        if not bucket:
            self._drop(length)
        return index, length

    def _drop(self, length: int) -> None:
        del self._by_length[length]
        del self._sorted[bisect.bisect_left(self._sorted, length)]


def _lookahead(
    lengths: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int, lookahead: int
) -> tuple[list[_Placement], bool]:
    """The better of two plans over the oldest ``lookahead`` candidates: anchored best-fit
    (:func:`_anchored_best_fit`) and first-fit in arrival order (:func:`_first_fit`).

    "Better" is the plan after which the rest of the window needs fewer batches by
    :func:`_batches_left`'s lower bound (ties: more samples, then more tokens, then anchored
    best-fit). Anchored best-fit usually wins; first-fit wins where largest-first topping-up
    would burn the short samples the long ones need as row mates (a bimodal mix), or where the
    sample cap binds. Both plans take the ``min(batch_size, max_valid_num, lookahead)`` oldest
    candidates, so the choice keeps the oldest-first guarantee: a sample with ``p`` older samples
    waiting is dispatched within ``p // min(batch_size, max_valid_num, lookahead) + 1`` batches.
    """
    window = lengths[:lookahead]
    candidates = (
        _anchored_best_fit(window, batch_size, seq_len, max_valid_num),
        _first_fit(window, batch_size, seq_len, max_valid_num),
    )
    left = _BatchesLeft(window, batch_size, seq_len, max_valid_num)
    placements, full = min(candidates, key=lambda candidate: left.after(candidate[0]))
    return placements, full or len(placements) < len(lengths)


class _BatchesLeft:
    """A lower bound on the batches the rest of a window needs once a plan has taken its part.

    Three resources bound it, whichever is scarcest: tokens (``batch_size * seq_len`` a batch),
    samples (``max_valid_num`` a batch) and rows for samples longer than ``seq_len / 2`` (no
    two of them share a row, so at most ``batch_size`` a batch).
    """

    def __init__(
        self, window: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int
    ) -> None:
        self._window = window
        self._tokens_per_batch = batch_size * seq_len
        self._batch_size = batch_size
        self._max_valid_num = max_valid_num
        self._half = seq_len // 2
        self._tokens = sum(window)
        self._long = sum(1 for length in window if length > self._half)

    def after(self, placements: Sequence[_Placement]) -> tuple[float, int, int]:
        """Sort key of a plan: (batches left, fewer samples taken, fewer tokens taken)."""
        taken = [self._window[index] for index, _, _ in placements]
        tokens = sum(taken)
        long = sum(1 for length in taken if length > self._half)
        left = max(
            (self._tokens - tokens) / self._tokens_per_batch,
            (len(self._window) - len(taken)) / self._max_valid_num,
            (self._long - long) / self._batch_size,
        )
        return left, -len(taken), -tokens


def _anchored_best_fit(
    window: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[list[_Placement], bool]:
    """Row by row: the oldest unplaced candidate anchors the row (so the oldest waiting sample
    always goes first, and the ``min(batch_size, max_valid_num)`` oldest always go in this
    batch), then the rest of the row is topped up with the largest candidates that still fit,
    which fills rows almost exactly on real length mixes. Slots are reserved so that the
    ``max_valid_num`` cap never takes away a later row's anchor.
    """
    index = _LengthIndex(window)
    placed = [False] * len(window)
    placements: list[_Placement] = []
    anchor = 0
    used_tokens = 0
    for row in range(batch_size):
        while anchor < len(window) and placed[anchor]:
            anchor += 1
        if anchor == len(window) or len(placements) == max_valid_num:
            break
        length = window[anchor]
        index.remove(anchor, length)
        placed[anchor] = True
        placements.append((anchor, row, 0))
        room = seq_len - length
        # Keep one slot for each later row's anchor, else the cap could starve the oldest.
        slot_limit = max_valid_num - min(batch_size - row - 1, max_valid_num)
        while room > 0 and len(placements) < slot_limit:
            found = index.pop_largest_fitting(room)
            if found is None:
                break
            filler, filler_length = found
            placed[filler] = True
            placements.append((filler, row, seq_len - room))
            room -= filler_length
        used_tokens += seq_len - room
    full = (
        len(placements) < len(window)
        or len(placements) == max_valid_num
        or used_tokens == batch_size * seq_len
    )
    return placements, full


def _stream(
    lengths: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int, lookahead: int
) -> PackPlan:
    """Across-rows packing: samples end to end in the flattened stream.

    Arrival order first; when the next sample no longer fits, the tail of the stream is topped
    up with the largest samples of the window that still fit (the only waste in this mode is
    that tail).
    """
    capacity = batch_size * seq_len
    window = lengths[:lookahead]
    chosen: list[int] = []
    used = 0
    next_index = 0
    while next_index < len(window) and len(chosen) < max_valid_num:
        if used + window[next_index] > capacity:
            break
        chosen.append(next_index)
        used += window[next_index]
        next_index += 1
    if next_index < len(window) and len(chosen) < max_valid_num:
        index = _LengthIndex(window[next_index:])
        while len(chosen) < max_valid_num:
            found = index.pop_largest_fitting(capacity - used)
            if found is None:
                break
            chosen.append(next_index + found[0])
            used += found[1]
    chosen_lengths = np.fromiter((lengths[i] for i in chosen), dtype=np.int64, count=len(chosen))
    starts = np.zeros(len(chosen), dtype=np.int64)
    if len(chosen) > 1:
        np.cumsum(chosen_lengths[:-1], out=starts[1:])
    rows = starts // seq_len
    segment_ids = _segment_ids(rows)
    full = len(chosen) < len(lengths) or len(chosen) == max_valid_num or used == capacity
    return PackPlan(tuple(chosen), chosen_lengths, starts, segment_ids, full)


def _segment_ids(rows: IntArray) -> IntArray:
    """1-based rank of each sample within its row, for samples sorted by stream position."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    first_in_row = np.ones(len(rows), dtype=bool)
    first_in_row[1:] = rows[1:] != rows[:-1]
    positions = np.arange(len(rows), dtype=np.int64)
    row_start = np.maximum.accumulate(np.where(first_in_row, positions, 0))
    return positions - row_start + 1


def _plan_from_rows(
    lengths: Sequence[int], placements: list[_Placement], seq_len: int, full: bool
) -> PackPlan:
    # Slot order is stream order (row-major), whatever order the algorithm placed samples in.
    placements.sort(key=lambda p: (p[1], p[2]))
    chosen = tuple(p[0] for p in placements)
    starts = np.fromiter(
        (row * seq_len + offset for _, row, offset in placements),
        dtype=np.int64,
        count=len(placements),
    )
    chosen_lengths = np.fromiter((lengths[i] for i in chosen), dtype=np.int64, count=len(chosen))
    rows = np.fromiter((p[1] for p in placements), dtype=np.int64, count=len(placements))
    return PackPlan(chosen, chosen_lengths, starts, _segment_ids(rows), full)


def _token_positions(plan: PackPlan) -> tuple[IntArray, IntArray]:
    """Flat stream position of every valid token, and each token's position inside its sample."""
    total = plan.num_tokens
    cumulative = np.zeros(plan.num_samples, dtype=np.int64)
    if plan.num_samples > 1:
        np.cumsum(plan.lengths[:-1], out=cumulative[1:])
    within = np.arange(total, dtype=np.int64) - np.repeat(cumulative, plan.lengths)
    return np.repeat(plan.starts, plan.lengths) + within, within


def build_feeds(
    plan: PackPlan,
    token_inputs: Mapping[str, Sequence[npt.NDArray[np.int32]]],
    *,
    batch_size: int,
    seq_len: int,
    position_input: str | None,
    position_values: Sequence[npt.NDArray[np.int32]] | None = None,
    mask_input: str | None,
    unpack_info_input: str | None = None,
    max_valid_num: int | None = None,
    binary_mask: bool = False,
) -> dict[str, npt.NDArray[np.int32]]:
    """Build the fixed-shape int32 feeds of one batch.

    Args:
        plan: Where each sample goes.
        token_inputs: Per input name, the 1-D token arrays of the chosen samples in slot order
            (``token_inputs[name][k]`` belongs to ``plan.chosen[k]``).
        batch_size: Rows.
        seq_len: Tokens per row.
        position_input: Name of the position-ids feed, or None if the device computes positions.
        position_values: Per-sample position ids in slot order; default ``0..L-1`` per sample.
        mask_input: Name of the attention-mask feed (segment ids), or None.
        unpack_info_input: Name of the ``[max_valid_num]`` sample-length feed, or None.
        max_valid_num: Length of ``unpack_info``.
        binary_mask: Write 1 (not the segment id) on valid tokens: a plain padding mask, for
            padded models (one sample per row) and for negative controls.

    Returns:
        Feeds by name, each ``[batch_size, seq_len]`` int32 (``unpack_info`` ``[max_valid_num]``).
    """
    flat_positions, within = _token_positions(plan)
    shape = (batch_size, seq_len)
    feeds: dict[str, npt.NDArray[np.int32]] = {}
    for name, arrays in token_inputs.items():
        tensor = np.zeros(shape, dtype=np.int32)
        if arrays:
            tensor.reshape(-1)[flat_positions] = np.concatenate(arrays)
        feeds[name] = tensor
    if position_input is not None:
        positions = np.zeros(shape, dtype=np.int32)
        values = np.concatenate(position_values) if position_values else within
        positions.reshape(-1)[flat_positions] = values
        feeds[position_input] = positions
    if mask_input is not None:
        mask = np.zeros(shape, dtype=np.int32)
        segment = np.ones_like(plan.segment_ids) if binary_mask else plan.segment_ids
        mask.reshape(-1)[flat_positions] = np.repeat(segment, plan.lengths)
        feeds[mask_input] = mask
    if unpack_info_input is not None:
        if max_valid_num is None:
            raise ValueError("max_valid_num is required with unpack_info_input")
        info = np.zeros(max_valid_num, dtype=np.int32)
        info[: plan.num_samples] = plan.lengths
        feeds[unpack_info_input] = info
    return feeds


def unpack_outputs(
    plan: PackPlan,
    outputs: Mapping[str, npt.NDArray[np.generic]],
    output_specs: Mapping[str, OutputSpec],
    *,
    seq_len: int,
) -> list[dict[str, npt.NDArray[np.generic]]]:
    """Cut the device outputs of one batch back into one result per sample, in slot order.

    Token outputs come back with length ``L`` (the sample's own length) in their first dim.
    Each result array is a view of one per-batch copy, never of the device's buffers, so
    callers own their results and cannot see each other's.

    Raises:
        ValueError: An output is missing or smaller than its layout requires.
    """
    results: list[dict[str, npt.NDArray[np.generic]]] = [{} for _ in range(plan.num_samples)]
    if plan.num_samples == 0:
        return results
    split_points = np.cumsum(plan.lengths[:-1])
    flat_positions: IntArray | None = None
    for name, spec in output_specs.items():
        if name not in outputs:
            raise ValueError(f"device returned no output {name!r}")
        array = np.asarray(outputs[name])
        trailing = array.shape[2:]
        if spec.layout not in (OutputLayout.SAMPLES, OutputLayout.ROWS) and array.ndim < 2:
            raise ValueError(
                f"output {name!r} has shape {array.shape}; {spec.layout} needs 2+ dims"
            )
        if spec.layout is OutputLayout.PACKED_TOKENS:
            if flat_positions is None:
                flat_positions, _ = _token_positions(plan)
            tokens = array.reshape((-1, *trailing))[flat_positions]
            pieces = np.split(tokens, split_points)
        elif spec.layout is OutputLayout.SAMPLE_TOKENS:
            if array.shape[0] < plan.num_samples:
                raise ValueError(
                    f"output {name!r} has {array.shape[0]} sample slots, batch has "
                    f"{plan.num_samples} samples"
                )
            mask = np.arange(array.shape[1]) < plan.lengths[:, None]
            tokens = array[: plan.num_samples][mask]
            pieces = np.split(tokens, split_points)
        elif spec.layout is OutputLayout.SEGMENTS:
            rows = plan.starts // seq_len
            pieces = list(array[rows, plan.segment_ids - 1])  # fancy indexing copies
        elif spec.layout is OutputLayout.ROWS:
            pieces = list(array[plan.starts // seq_len])
        else:
            pieces = list(array[: plan.num_samples].copy())
        for result, piece in zip(results, pieces, strict=True):
            result[name] = piece
    return results


def pack_offline(
    lengths: Sequence[int],
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    across_rows: bool = False,
) -> list[PackPlan]:
    """Pack a whole dataset known up front into as few batches as we can.

    Offline there is no arrival order to respect, so several packings are tried and the one with
    the fewest batches is kept: the online lookahead rule with windows of 256 and 1024, and
    best-fit-decreasing rows dealt out to batches with balanced sample counts. Across rows the
    stream packing is already within a batch of the token bound.

    Returns:
        The batches; ``plan.chosen`` holds indices into ``lengths``.
    """
    options = {"batch_size": batch_size, "seq_len": seq_len, "max_valid_num": max_valid_num}
    if across_rows:
        return drain_queue(lengths, algorithm=PackAlgorithm.STREAM, **options)
    candidates = [
        drain_queue(lengths, algorithm=PackAlgorithm.LOOKAHEAD, lookahead=256, **options),
        drain_queue(lengths, algorithm=PackAlgorithm.LOOKAHEAD, lookahead=1024, **options),
        _best_fit_decreasing_batches(lengths, batch_size, seq_len, max_valid_num),
    ]
    return min(candidates, key=len)


def drain_queue(
    lengths: Sequence[int],
    *,
    algorithm: PackAlgorithm,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    lookahead: int = 256,
) -> list[PackPlan]:
    """The batches a runner forms when every sample is queued before the first batch does.

    :func:`plan_batch` is applied to the queue again and again until it is empty, exactly as the
    runner's batcher would with no new arrivals.

    Returns:
        The batches in dispatch order; ``plan.chosen`` holds indices into ``lengths``.
    """
    remaining = list(range(len(lengths)))
    plans: list[PackPlan] = []
    while remaining:
        plan = plan_batch(
            [lengths[i] for i in remaining],
            algorithm=algorithm,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
            lookahead=lookahead,
        )
        taken = set(plan.chosen)
        plans.append(_reindex(plan, [remaining[i] for i in plan.chosen]))
        remaining = [index for k, index in enumerate(remaining) if k not in taken]
    return plans


def _reindex(plan: PackPlan, chosen: list[int]) -> PackPlan:
    return PackPlan(
        tuple(chosen), plan.lengths, plan.starts, plan.segment_ids, plan.full, plan.shape
    )


def _best_fit_decreasing_batches(
    lengths: Sequence[int], batch_size: int, seq_len: int, max_valid_num: int
) -> list[PackPlan]:
    # 1. Rows: best-fit decreasing (each sample into the fullest row it fits).
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # sorted (room left, row number)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        position = bisect.bisect_left(rooms, (length, -1))
        if position < len(rooms):
            room, row = rooms.pop(position)
            rows[row].append(index)
            room -= length
        else:
            rows.append([index])
            room, row = seq_len - length, len(rows) - 1
        if room > 0:
            bisect.insort(rooms, (room, row))
    # 2. Batches: deal rows, most samples first, to the batch with the fewest samples that
    #    still has a free row and room under the sample cap; add batches until it works.
    batch_count = -(-len(rows) // batch_size)
    while True:
        batches: list[list[list[int]]] = [[] for _ in range(batch_count)]
        counts = [0] * batch_count
        for row_indices in sorted(rows, key=len, reverse=True):
            fits = [
                b
                for b in range(batch_count)
                if len(batches[b]) < batch_size and counts[b] + len(row_indices) <= max_valid_num
            ]
            if not fits:
                break
            target = min(fits, key=lambda b: counts[b])
            batches[target].append(row_indices)
            counts[target] += len(row_indices)
        else:
            return [
                _plan_from_rows(
                    lengths,
                    [
                        (index, row_number, sum(lengths[i] for i in row[:k]))
                        for row_number, row in enumerate(batch)
                        for k, index in enumerate(row)
                    ],
                    seq_len,
                    True,
                )
                for batch in batches
                if batch
            ]
        batch_count += 1
