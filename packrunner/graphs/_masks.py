"""The additive attention biases of each input form, written once for builder and converter.

Every packed attention in packrunner adds one of these to its ``[rows, heads, S, S]`` scores
before Softmax: 0 where a query may attend to a key, :data:`MASK_BIAS` where it may not. The
bias per unpack/repack slot lives with the stream index
(:meth:`packrunner.graphs.StreamIndex.attention_bias`), which it is computed from.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from onnx import TensorProto

from packrunner.graphs._graph import NodeEmitter

__all__ = ["MASK_BIAS", "block_diagonal_bias", "padding_bias"]

MASK_BIAS: Final = -10000.0
"""Additive bias on a forbidden attention score. Finite (unlike -inf) so a query with no allowed key
(a padding token, an empty slot) gets a uniform softmax instead of NaN; large enough that
``exp(-10000)`` underflows to exactly 0 in fp32 and fp16, so masked keys contribute nothing."""


def block_diagonal_bias(
    emit: NodeEmitter, segment_ids: str, elem_type: int = TensorProto.FLOAT
) -> str:
    """``[B, 1, S, S]`` bias letting each token attend only to tokens of its own segment.

    Args:
        emit: Where the nodes go.
        segment_ids: ``[B, S]`` int32 segment ids (1, 2, ... per sample of a row, 0 on padding),
            the ``attention_mask`` of :attr:`~packrunner.InputForm.PACKED`.
        elem_type: ONNX element type of the bias (the scores' type).

    Returns:
        The bias, broadcastable over heads.
    """
    # The bias is the only [B, S, S] work packing adds to a batch, so it is built with as few
    # full-size ops as possible: padding keys get segment -1, which no query (ids >= 0) equals
    # (one Equal instead of Equal, Greater and And), and Cast + Mul replaces a scalar-branch
    # Where, which onnxruntime runs ~3x slower. Packed overhead per batch: 9% -> 4%.
    is_token = emit.op("Greater", [segment_ids, emit.const(0, np.int32, "zero")], "is_token")
    key_ids = emit.op(
        "Where", [is_token, segment_ids, emit.const(-1, np.int32, "minus_one")], "key_ids"
    )  # [B, S], -1 on padding
    query = emit.with_axes("Unsqueeze", segment_ids, [2], "query_segment")  # [B, S, 1]
    key = emit.with_axes("Unsqueeze", key_ids, [1], "key_segment")  # [B, 1, S]
    blocked = emit.op("Not", [emit.op("Equal", [query, key], "same_segment")], "blocked")
    blocked_f = emit.op("Cast", [blocked], "blocked_f", to=elem_type)
    bias = emit.op("Mul", [blocked_f, emit.typed_const(MASK_BIAS, elem_type, "drop")], "bias")
    return emit.with_axes("Unsqueeze", bias, [1], "bias_4d")  # broadcasts over heads


def padding_bias(
    emit: NodeEmitter, mask: str, *, batch_size: int | None, seq_len: int | None
) -> str:
    """Float ``[B, 1, 1, S]`` bias ``(1 - mask) * MASK_BIAS`` of a 0/1 padding mask.

    Hugging Face's extended attention mask, for :attr:`~packrunner.InputForm.PADDED` models.
    ``batch_size`` / ``seq_len`` None: the mask's dims are dynamic, and the bias takes them
    from the mask (an Unsqueeze rather than a Reshape to a constant shape).
    """
    mask_f = emit.op("Cast", [mask], "mask_f", to=TensorProto.FLOAT)
    inverted = emit.op("Sub", [emit.const(1.0, np.float32, "one"), mask_f], "inverted")
    bias = emit.op("Mul", [inverted, emit.const(MASK_BIAS, np.float32, "drop")], "bias")
    if batch_size is None or seq_len is None:
        return emit.with_axes("Unsqueeze", bias, [1, 2], "bias_4d")
    shape = emit.const([batch_size, 1, 1, seq_len], np.int64, "bias_shape")
    return emit.op("Reshape", [bias, shape], "bias_4d")
