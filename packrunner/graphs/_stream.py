"""The stream index of :attr:`~packrunner.InputForm.UNPACK_REPACK` models, written once.

In that form the token inputs are one stream of ``N = batch_size * seq_len`` tokens in which
samples sit back to back, possibly across rows, and ``unpack_info`` ``[M]`` lists their lengths.
Token-wise layers run on the stream; attention (and the per-sample outputs) run on an unpacked
``[M, S]`` view in which slot ``k`` holds sample ``k`` from position 0. :class:`StreamIndex` emits,
once per graph, the index tensors that map the stream to slots and back, and the ops that use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
from onnx import TensorProto

from packrunner.graphs._graph import NodeEmitter
from packrunner.graphs._masks import MASK_BIAS

__all__ = ["UNPACK_INFO", "StreamIndex"]

UNPACK_INFO: Final = "unpack_info"
"""The graph input holding the samples' lengths (``[max_valid_num]`` int32, 0 for unused slots)."""


class StreamIndex:
    """Index tensors mapping the token stream to per-sample slots and back.

    Attributes:
        emit: The emitter the index and every op using it are written with.
        lengths: ``[M]`` int32 sample lengths (``unpack_info``).
        gather: ``[M, S]`` int32 stream index of slot ``k``'s token ``p`` (0 where invalid).
        valid: ``[M, S]`` bool, ``p < lengths[k]`` and inside the stream.
        inverse: ``[N]`` int32 flat ``k * S + p`` slot index of stream token ``t`` (0 for stream
            padding), so ``Gather(slots.reshape(M * S, ...), inverse)`` repacks.
    """

    def __init__(
        self,
        emit: NodeEmitter,
        lengths: str,
        *,
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
    ) -> None:
        """Emit the index tensors, computed from ``lengths`` (``[max_valid_num]`` int32)."""
        self.emit = emit
        self.lengths = lengths
        self.batch_size, self.seq_len, self.max_valid_num = batch_size, seq_len, max_valid_num
        e, m, s, n = emit, max_valid_num, seq_len, batch_size * seq_len
        # Sample k starts at the exclusive prefix sum of the lengths before it.
        ends = e.op("CumSum", [lengths, e.const(0, np.int32, "axis0")], "ends")  # [M] inclusive
        starts = e.op("Sub", [ends, lengths], "starts")  # [M] exclusive
        slot_pos = e.const(np.arange(s).reshape(1, s), np.int32, "slot_positions")  # [1, S]
        in_sample = e.op(
            "Less", [slot_pos, e.with_axes("Unsqueeze", lengths, [1], "lengths_col")], "in_sample"
        )  # [M, S]
        stream_pos = e.op(
            "Add", [e.with_axes("Unsqueeze", starts, [1], "starts_col"), slot_pos], "stream_pos"
        )  # [M, S]
        # Lengths that sum past the stream are invalid input: masking them keeps every Gather in
        # bounds (finite garbage for that slot) instead of failing the whole batch in the runtime.
        in_stream = e.op("Less", [stream_pos, e.const(n, np.int32, "num_tokens")], "in_stream")
        self.valid = e.op("And", [in_sample, in_stream], "valid")
        zero = e.const(0, np.int32, "zero")
        self.gather = e.op("Where", [self.valid, stream_pos, zero], "gather")

        # Inverse map. The sample holding stream token t is the number of samples that ended at
        # or before t; counting (rather than searching) handles zero-length slots anywhere.
        stream_col = e.const(np.arange(n).reshape(n, 1), np.int32, "stream_positions_col")
        ended = e.op(
            "GreaterOrEqual", [stream_col, e.with_axes("Unsqueeze", ends, [0], "ends_row")], "ended"
        )  # [N, M]
        ended_i = e.op("Cast", [ended], "ended_i", to=TensorProto.INT32)
        sample = e.with_axes("ReduceSum", ended_i, [1], "sample", keepdims=0)  # [N]
        slot = e.op("Min", [sample, e.const(m - 1, np.int32, "last_slot")], "slot")
        offset = e.op(
            "Sub",
            [
                e.const(np.arange(n), np.int32, "stream_positions"),
                e.op("Gather", [starts, slot], "slot_start"),
            ],
            "offset",
        )
        flat = e.op(
            "Add",
            [e.op("Mul", [slot, e.const(s, np.int32, "seq_len")], "slot_base"), offset],
            "flat",
        )
        # sample == M means t is past the last token (stream padding); offset >= S only for an
        # invalid length > seq_len. Either way point at slot 0: finite, and never read back.
        real = e.op(
            "And",
            [
                e.op("Less", [sample, e.const(m, np.int32, "num_slots")], "has_sample"),
                e.op("Less", [offset, e.const(s, np.int32, "seq_len")], "in_row"),
            ],
            "real",
        )
        self.inverse = e.op("Where", [real, flat, zero], "inverse")
        self._biases: dict[int, str] = {}

    def attention_bias(self, elem_type: int = TensorProto.FLOAT) -> str:
        """``[M, 1, 1, S]`` bias: 0 on a slot's own tokens, :data:`MASK_BIAS` past its length."""
        if elem_type not in self._biases:
            e = self.emit
            keep = e.typed_const(0.0, elem_type, "keep")
            drop = e.typed_const(MASK_BIAS, elem_type, "drop")
            bias = e.op("Where", [self.valid, keep, drop], "slot_bias")  # [M, S]
            shape = e.const([self.max_valid_num, 1, 1, self.seq_len], np.int64, "slot_bias_shape")
            self._biases[elem_type] = e.op("Reshape", [bias, shape], "slot_bias_4d")
        return self._biases[elem_type]

    def unpack(self, stream: str, base: str = "unpacked") -> str:
        """``[N, *rest]`` stream tensor -> ``[M, S, *rest]`` slots (garbage past each length)."""
        return self.emit.op("Gather", [stream, self.gather], base)

    def unpack_zeroed(
        self,
        stream: str,
        trailing: Sequence[int],
        elem_type: int,
        base: str = "slots",
        *,
        out: str | None = None,
    ) -> str:
        """:meth:`unpack`, then zero past each sample's length: a slot holds its sample only.

        Args:
            stream: ``[N, *trailing]`` stream tensor.
            trailing: The dims after the token axis.
            elem_type: ONNX element type of ``stream``.
            base: Base of the fresh names.
            out: Exact name of the result (a graph output).
        """
        e = self.emit
        slots = self.unpack(stream, f"{base}_unzeroed")
        valid = self.valid
        if trailing:
            shape = [self.max_valid_num, self.seq_len] + [1] * len(trailing)
            valid = e.op("Reshape", [valid, e.const(shape, np.int64, f"{base}_valid_shape")])
        zero = e.typed_const(0.0, elem_type, "zero_value")
        return e.op("Where", [valid, slots, zero], base, out=out)

    def repack(self, slots: str, base: str = "repacked") -> str:
        """``[M * S, *rest]`` flat slots -> ``[N, *rest]`` stream, each token at its position."""
        return self.emit.op("Gather", [slots, self.inverse], base)
