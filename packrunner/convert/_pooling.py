"""Per-sequence heads in packed rows: the pooling of each head rewritten per segment or slot.

A :class:`~packrunner.convert._match_pooling.Pooling` names the token tensor a head pools, the
pooled tensor it reads and the outputs it computes. The rewrite replaces the pooled tensor and
leaves the head itself (dense, tanh, dropout, classifier ...) as exported:

* packed (:func:`pool_per_segment`): ``K = seq_len`` segments per row (every sample has at least
  one token, so no row can hold more); segment ``k`` of row ``b`` is the tokens whose segment id
  (``attention_mask``) is ``k + 1``. First-token pooling gathers each segment's first token,
  mean pooling is ``sum(member * h) / max(count, 1)`` over the ``[B, K, S]`` membership. The head
  then runs on ``[B * K, width]`` rows, exactly as it ran on ``[batch, width]``, and each output
  becomes ``[B, K, ...]`` (:attr:`~packrunner.OutputLayout.SEGMENTS`). Segments a row does not
  have give finite values that are never read.
* unpack/repack (:func:`expose_hidden`, then :func:`pool_per_slot`): the pooled token tensor is
  made an output so that :func:`~packrunner.convert._unpack.unpack_attention` unpacks it into
  zeroed ``[M, S, width]`` slots; the pooling then reads slot ``k``'s first token or its sum over
  ``max(unpack_info[k], 1)``, and the head runs on ``[M, width]``: outputs ``[M, ...]``
  (:attr:`~packrunner.OutputLayout.SAMPLES`), zero in unused slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from packrunner.convert._match_pooling import Pooling, PoolingKind
from packrunner.graphs import UNPACK_INFO, GraphView, NodeEmitter

__all__ = [
    "expose_hidden",
    "pool_per_segment",
    "pool_per_slot",
    "segment_first_tokens",
    "segment_membership",
]


def pool_per_segment(
    view: GraphView,
    poolings: Sequence[Pooling],
    *,
    batch_size: int,
    seq_len: int,
    opset: int,
    segment_ids: str = "attention_mask",
) -> set[str]:
    """Rewrite every pooling per (row, segment); the head outputs become ``[B, K, ...]``.

    Returns:
        The names of the nodes added (they read the int32 segment ids as they are).
    """
    b, s = batch_size, seq_len
    k = seq_len
    emit = NodeEmitter(view, prefix="packrunner/pooling", opset=opset)
    member = segment_membership(emit, segment_ids, max_segments=k)
    first_index: str | None = None
    for pooling in poolings:
        if pooling.kind is PoolingKind.FIRST_TOKEN:
            if first_index is None:
                first_index = segment_first_tokens(emit, member, batch_size=b, seq_len=s)
            tokens = emit.op(
                "Reshape",
                [pooling.hidden, emit.const([b * s, pooling.width], np.int64, "tokens_shape")],
                "tokens",
            )
            pooled = emit.op("Gather", [tokens, first_index], "first_tokens")  # [B * K, width]
        else:
            weights = emit.op("Cast", [member], "member_weights", to=pooling.elem_type)
            sums = emit.op("MatMul", [weights, pooling.hidden], "segment_sums")  # [B, K, width]
            counts = emit.with_axes("ReduceSum", weights, [2], "segment_counts", keepdims=1)
            one = emit.typed_const(1.0, pooling.elem_type, "one")
            pooled = emit.op(
                "Div", [sums, emit.op("Max", [counts, one], "segment_divisors")], "segment_means"
            )
        pooled = emit.op(
            "Reshape",
            [pooled, emit.const([b * k, *pooling.pooled_trailing], np.int64, "pooled_shape")],
            "pooled",
        )
        _attach_head(view, emit, pooling, pooled, [b, k])
    view.graph.node.extend(emit.nodes)
    view.refresh()
    return {node.name for node in emit.nodes}


def segment_membership(emit: NodeEmitter, segment_ids: str, *, max_segments: int) -> str:
    """``[B, K, S]`` bool: token ``p`` of row ``b`` belongs to segment ``k`` (id ``k + 1``)."""
    k = max_segments
    row_ids = emit.with_axes("Unsqueeze", segment_ids, [1], "segment_ids_row")  # [B, 1, S]
    numbers = emit.const(np.arange(1, k + 1).reshape(1, k, 1), np.int32, "segment_numbers")
    return emit.op("Equal", [row_ids, numbers], "member")


def segment_first_tokens(emit: NodeEmitter, member: str, *, batch_size: int, seq_len: int) -> str:
    """``[B * K]`` flat token index (``row * S + position``) of each segment's first token.

    Args:
        emit: Where the nodes go.
        member: ``[B, K, S]`` bool, token ``p`` of row ``b`` is in segment ``k + 1``.
        batch_size: ``B``.
        seq_len: ``S`` (and ``K``).
    """
    b, s = batch_size, seq_len
    member_f = emit.op("Cast", [member], "member_f", to=TensorProto.FLOAT)
    # ArgMax returns the first maximum: the segment's first token (0 if it has none).
    first = emit.op("ArgMax", [member_f], "first_token", axis=2, keepdims=0)  # [B, K] int64
    row_base = emit.const((np.arange(b) * s).reshape(b, 1), np.int64, "row_base")
    return emit.op(
        "Reshape",
        [emit.op("Add", [first, row_base], "first_flat"), emit.const([b * s], np.int64)],
        "first_flat_1d",
    )


def expose_hidden(
    view: GraphView, poolings: Sequence[Pooling], *, batch_size: int, seq_len: int
) -> list[str]:
    """Make each pooled token tensor a ``[B, S, width]`` graph output (unpack/repack, step 1).

    The head outputs get their static shape on the ``[B, S]`` graph, ``[B, ...]``, until
    :func:`pool_per_slot` makes them ``[M, ...]``.

    Returns:
        The outputs added (:func:`pool_per_slot` removes them again).
    """
    outputs = {o.name for o in view.graph.output}
    added = []
    for pooling in poolings:
        _set_output_shape(view, pooling, [batch_size])
        if pooling.hidden in outputs or pooling.hidden in added:
            continue
        view.graph.output.append(
            helper.make_tensor_value_info(
                pooling.hidden, pooling.elem_type, [batch_size, seq_len, pooling.width]
            )
        )
        added.append(pooling.hidden)
    view.refresh()
    return added


def pool_per_slot(
    view: GraphView,
    poolings: Sequence[Pooling],
    exposed: Sequence[str],
    *,
    max_valid_num: int,
    opset: int,
) -> None:
    """Pool each sample slot (unpack/repack, step 2): head outputs become ``[M, ...]``.

    Args:
        view: The graph after :func:`~packrunner.convert._unpack.unpack_attention`: each pooled
            token tensor's name now holds its zeroed ``[M, S, width]`` slots.
        poolings: As found on the exported graph.
        exposed: What :func:`expose_hidden` added; dropped from the outputs here.
        max_valid_num: ``M``.
        opset: Default-domain opset of the model.
    """
    m = max_valid_num
    emit = NodeEmitter(view, prefix="packrunner/pooling", opset=opset)
    used = emit.op("Greater", [UNPACK_INFO, emit.const(0, np.int32, "zero_length")], "used")
    for pooling in poolings:
        slots = pooling.hidden
        if pooling.kind is PoolingKind.FIRST_TOKEN:
            pooled = emit.op(
                "Gather", [slots, emit.const(0, np.int64, "first")], "first_tokens", axis=1
            )
        else:
            sums = emit.with_axes("ReduceSum", slots, [1], "slot_sums", keepdims=0)  # [M, width]
            lengths = emit.op("Cast", [UNPACK_INFO], "slot_lengths", to=pooling.elem_type)
            one = emit.typed_const(1.0, pooling.elem_type, "one")
            divisors = emit.with_axes(
                "Unsqueeze", emit.op("Max", [lengths, one], "slot_divisors"), [1], "divisors_col"
            )
            pooled = emit.op("Div", [sums, divisors], "slot_means")
        pooled = emit.op(
            "Reshape",
            [pooled, emit.const([m, *pooling.pooled_trailing], np.int64, "pooled_shape")],
            "pooled",
        )
        _attach_head(view, emit, pooling, pooled, [m], used)
    view.graph.node.extend(emit.nodes)
    kept = [o for o in view.graph.output if o.name not in exposed]
    del view.graph.output[:]
    view.graph.output.extend(kept)
    view.refresh()


def _attach_head(
    view: GraphView,
    emit: NodeEmitter,
    pooling: Pooling,
    pooled: str,
    lead: Sequence[int],
    used: str | None = None,
) -> None:
    """Make the head read ``pooled`` (``[prod(lead), ...]`` rows) and shape its outputs ``lead``.

    ``used`` (``[M]`` bool, slots only): outputs are zero in unused slots, as per-token ones are.
    """
    renamed = {}
    for output in pooling.outputs:
        renamed[output] = view.fresh_name(f"{output}_rows")
        view.rename_tensor(output, renamed[output])
    source = renamed.get(pooling.pooled, pooling.pooled)
    for node in view.consumers(source):
        for slot, name in enumerate(node.input):
            if name == source:
                node.input[slot] = pooled
    view.refresh()
    for output in pooling.outputs:
        value = pooled if output == pooling.pooled else renamed[output]
        trailing = list(pooling.trailing[output])
        shape = emit.const([*lead, *trailing], np.int64, "outputs_shape")
        if used is None:
            emit.op("Reshape", [value, shape], f"{output}_per_segment", out=output)
            continue
        per_slot = emit.op("Reshape", [value, shape], f"{output}_per_slot")
        used_shape = emit.const([*lead, *[1] * len(trailing)], np.int64, "used_shape")
        elem_type = next(o for o in view.graph.output if o.name == output).type.tensor_type
        zero = emit.typed_const(0.0, elem_type.elem_type, "zero")
        used_b = emit.op("Reshape", [used, used_shape], f"{output}_used")
        emit.op("Where", [used_b, per_slot, zero], f"{output}_zeroed", out=output)
    _set_output_shape(view, pooling, lead)


def _set_output_shape(view: GraphView, pooling: Pooling, lead: Sequence[int]) -> None:
    """Declare each head output ``[*lead, *trailing]``."""
    for index, value in enumerate(view.graph.output):
        if value.name in pooling.outputs:
            shape = [*lead, *pooling.trailing[value.name]]
            elem_type = value.type.tensor_type.elem_type
            view.graph.output[index].CopyFrom(
                helper.make_tensor_value_info(value.name, elem_type, shape)
            )
