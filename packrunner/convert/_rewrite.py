"""Graph rewrites of the converter: static shapes, int32 inputs, ``position_ids``, packed masks.

Each rewrite applies what a finder of :mod:`packrunner.convert._match` described, in place, and
leaves the view current (:meth:`~packrunner.graphs.GraphView.refresh`) for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from packrunner.convert._match import (
    PACKED_INPUT_NAMES,
    ExportInputs,
    MaskSite,
    TensorTypes,
    dims,
)
from packrunner.convert._match_positions import PositionKind, PositionLookup
from packrunner.errors import ConversionError
from packrunner.graphs import GraphView, NodeEmitter, block_diagonal_bias

__all__ = [
    "drop_outputs",
    "expose_position_ids",
    "free_name",
    "require_mask_replaced",
    "reroute_shape_reads",
    "retype_inputs",
    "unwrap_upgraded_softmax",
    "set_static_output_shapes",
    "use_block_diagonal_bias",
]

logger = logging.getLogger("packrunner.convert")

# Consumers that accept int32 indices/data as well as int64, so a converted int32 input can feed
# them directly instead of through a Cast. (input slot, or None for "any slot")
_INT32_OK: dict[str, int | None] = {"Gather": 1, "Shape": None, "Size": None}


def free_name(view: GraphView, name: str) -> None:
    """Rename an internal tensor that already has the name a new graph input needs."""
    if view.is_taken(name):  # e.g. a traced ``position_ids`` variable
        view.rename_tensor(name, view.fresh_name(f"{name}_internal"))


def use_block_diagonal_bias(view: GraphView, sites: Sequence[MaskSite], *, opset: int) -> set[str]:
    """Add the segment-id bias in place of the exported mask at every site.

    Returns:
        The names of the nodes added (one bias per element type, shared by every layer).
    """
    emit = NodeEmitter(view, prefix="packrunner/block_mask", opset=opset)
    biases: dict[int, str] = {}
    for site in sites:
        if site.elem_type not in biases:
            biases[site.elem_type] = block_diagonal_bias(emit, "attention_mask", site.elem_type)
        add = view.producer(site.add)
        assert add is not None  # found on this graph
        add.input[site.operand] = biases[site.elem_type]
    view.graph.node.extend(emit.nodes)
    view.refresh()
    return {node.name for node in emit.nodes}


def expose_position_ids(view: GraphView, lookup: PositionLookup, *, opset: int) -> set[str]:
    """Feed the position lookup from ``lookup.offset + position_ids`` (a 0-based graph input).

    The converted graph owns the offset (RoBERTa's ``padding_idx + 1``), so whatever feeds it
    (the runner) always gives each sample ``0 .. L-1``.

    Returns:
        The names of the nodes added (they read the int32 input as it is).
    """
    gather = view.producer(lookup.gather)
    assert gather is not None  # found on this graph
    if lookup.kind is not PositionKind.INPUT:
        view.graph.input.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT32, [None, None])
        )
    emit = NodeEmitter(view, prefix="packrunner/positions", opset=opset)
    indices = "position_ids"
    if lookup.offset:
        indices = emit.op("Add", ["position_ids", emit.const(lookup.offset, np.int32, "offset")])
    if lookup.kind is PositionKind.INPUT:
        # Every reader of the exported input now reads the offset positions.
        for node in view.consumers("position_ids"):
            for slot, name in enumerate(node.input):
                if name == "position_ids" and indices != "position_ids":
                    node.input[slot] = indices
    gather.input[1] = indices
    view.graph.node.extend(emit.nodes)
    view.refresh()
    logger.info("position_ids (+%d) now feeds Gather %r", lookup.offset, lookup.gather)
    return {node.name for node in emit.nodes}


def unwrap_upgraded_softmax(view: GraphView, rank_of: Callable[[list[str]], list[int]]) -> int:
    """Undo ``Flatten -> Softmax -> Reshape`` where it is a plain last-axis Softmax.

    Upgrading an opset < 13 ``Softmax(axis=a)`` wraps it so (the old axis meant "flatten from
    ``a``"); on attention scores ``a`` is the last axis, and the wrapper would hide the scores'
    data flow from the mask and attention-core finders.

    Returns:
        How many Softmax nodes were unwrapped.
    """
    wrapped: list[tuple[onnx.NodeProto, onnx.NodeProto, int]] = []
    for softmax in [n for n in view.graph.node if n.op_type == "Softmax"]:
        flatten = view.producer(softmax.input[0])
        readers = view.consumers(softmax.output[0])
        if flatten is None or flatten.op_type != "Flatten" or len(readers) != 1:
            continue
        reshape = readers[0]
        shape_of = view.producer(reshape.input[1]) if reshape.op_type == "Reshape" else None
        if shape_of is None or shape_of.op_type != "Shape" or shape_of.input[0] != flatten.input[0]:
            continue
        axis = next((a.i for a in flatten.attribute if a.name == "axis"), 1)
        wrapped.append((softmax, reshape, axis))
    # The rank of each wrapped tensor is the length of the Shape the Reshape restores.
    ranks = rank_of([reshape.input[1] for _, reshape, _ in wrapped]) if wrapped else []
    unwrapped = 0
    for (softmax, reshape, axis), rank in zip(wrapped, ranks, strict=True):
        if axis % rank != rank - 1:
            continue  # a softmax over several axes: keep the wrapper
        flatten = view.producer(softmax.input[0])
        assert flatten is not None  # matched above
        softmax.input[0] = flatten.input[0]
        softmax.output[0] = reshape.output[0]
        view.graph.node.remove(reshape)
        unwrapped += 1
    view.refresh()
    view.prune()
    return unwrapped


def drop_outputs(view: GraphView, names: Collection[str]) -> None:
    """Remove graph outputs (their subgraphs go at the next prune)."""
    kept = [o for o in view.graph.output if o.name not in names]
    del view.graph.output[:]
    view.graph.output.extend(kept)
    view.refresh()


def reroute_shape_reads(view: GraphView, tensor: str, same_shape: str) -> int:
    """Make shape-only readers (``Shape``, ``Size``) of ``tensor`` read ``same_shape`` instead.

    ``attention_mask`` and ``input_ids`` have one shape in every form; a ``Shape(attention_mask)``
    (DistilBERT's dynamo export) is no use of the mask's values, and must not keep the input alive.

    Returns:
        How many nodes were rerouted.
    """
    readers = [n for n in view.consumers(tensor) if n.op_type in ("Shape", "Size")]
    for node in readers:
        node.input[0] = same_shape
    view.refresh()
    return len(readers)


def require_mask_replaced(view: GraphView, ours: Collection[str], consequence: str) -> None:
    """Fail if a node other than ``ours`` still reads ``attention_mask`` after the mask rewrite."""
    others = [n for n in view.consumers("attention_mask") if n.name not in ours]
    if others:
        readers = [f"{n.op_type} {n.name or n.output[0]!r}" for n in others]
        raise ConversionError(
            "attention mask subgraph not found in full: after replacing the mask added before "
            f"Softmax, attention_mask still feeds {readers}{consequence}"
        )


def retype_inputs(view: GraphView, *, batch_size: int, seq_len: int, ours: Collection[str]) -> None:
    """Make the packed inputs int32 ``[batch_size, seq_len]``, casting back where needed.

    A consumer that needs the exported int64 (anything but a Gather's indices or a Shape) reads a
    Cast of the new input instead; nodes in ``ours`` take int32 as they are.
    """
    graph = view.graph
    for index, value in enumerate(graph.input):
        if value.name not in PACKED_INPUT_NAMES:
            continue
        old_type = value.type.tensor_type.elem_type
        if old_type != TensorProto.INT32:
            cast_name: str | None = None
            for node in view.consumers(value.name):
                if node.name in ours:
                    continue
                for slot, name in enumerate(node.input):
                    if name != value.name or _accepts_int32(node, slot):
                        continue
                    if cast_name is None:
                        cast_name = view.fresh_name(f"{value.name}_int64")
                        graph.node.append(
                            helper.make_node(
                                "Cast",
                                [value.name],
                                [cast_name],
                                name=view.fresh_name(f"{value.name}_Cast"),
                                to=old_type,
                            )
                        )
                    node.input[slot] = cast_name
        graph.input[index].CopyFrom(
            helper.make_tensor_value_info(value.name, TensorProto.INT32, [batch_size, seq_len])
        )
    view.refresh()


def _accepts_int32(node: onnx.NodeProto, slot: int) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _INT32_OK:
        return False
    allowed = _INT32_OK[node.op_type]
    return allowed is None or allowed == slot


def set_static_output_shapes(
    model: onnx.ModelProto,
    types: TensorTypes,
    inputs: ExportInputs,
    *,
    batch_size: int,
    seq_len: int,
) -> None:
    """Give every output its static shape: mapped from the input axes, else inferred."""
    graph = model.graph
    inferred: dict[str, list[str | int | None] | None] | None = None
    for index, output in enumerate(graph.output):
        found = dims(output) or types.dims(output.name) or []
        shape: list[int] = []
        for axis, dim in enumerate(found):
            if dim == inputs.batch_dim and axis == 0:
                shape.append(batch_size)
            elif dim == inputs.seq_dim and axis == 1:
                shape.append(seq_len)
            elif isinstance(dim, int):
                shape.append(dim)
            else:
                # Some other symbolic axis: let shape inference on the now-static inputs compute
                # it (done at most once, it serialises the whole model).
                if inferred is None:
                    inferred = _infer_static_output_dims(model)
                guess = inferred.get(output.name) or []
                value = guess[axis] if axis < len(guess) else None
                if not isinstance(value, int):
                    raise ConversionError(
                        f"cannot determine axis {axis} ({dim!r}) of output {output.name!r} "
                        "for the static shape"
                    )
                shape.append(value)
        graph.output[index].CopyFrom(
            helper.make_tensor_value_info(output.name, output.type.tensor_type.elem_type, shape)
        )


def _infer_static_output_dims(model: onnx.ModelProto) -> dict[str, list[str | int | None] | None]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for output in probe.graph.output:
        output.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    return {o.name: dims(o) for o in inferred.graph.output}
