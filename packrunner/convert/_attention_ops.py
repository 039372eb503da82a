"""Attention computed by one node: the ONNX ``Attention`` op and onnxruntime's fused forms.

Exporters at opset 23 (the ONNX ``Attention`` op) and onnxruntime's transformer optimizer
(``com.microsoft`` ``Attention`` / ``MultiHeadAttention``) compute a whole attention in one node,
so there is no Softmax whose scores the mask is added to (:func:`~packrunner.convert._match.
find_mask_sites`). Each of these ops takes an *additive* mask input, though, and that is all the
packed form needs: the block-diagonal bias of the segment ids (the one
:func:`packrunner.graphs.block_diagonal_bias` every packed attention uses) goes into that input.

* ONNX ``Attention`` (``attn_mask``, input 3, bool or additive): an exported mask computed from
  ``attention_mask`` alone that is a pure padding mask (checked by computing it for a mask of
  ones: it must let every query attend to every key) is replaced by the bias, which hides padding
  keys too; a mask that reads no input (a constant band or causal mask) is kept and the bias added
  to it (a bool mask first becomes ``0`` / ``MASK_BIAS``); anything else (a band folded into the
  padding mask, a mask read from other inputs) is refused.
* ``com.microsoft`` ``Attention`` (``mask_index`` input 3, ``attention_bias`` input 5) and
  ``MultiHeadAttention`` (``key_padding_mask`` input 4, ``attention_bias`` input 5): the padding
  mask input must be computed from ``attention_mask`` alone and is dropped; the bias goes into
  ``attention_bias`` (added to one already there, by the rule above).
* Ops with a KV cache (``past`` inputs) are decoders: refused, naming the op.

Everything else that fuses attention or the embeddings (``EmbedLayerNormalization`` hides the
position lookup, ``PackedAttention`` takes its own packing) stays refused by name
(:func:`~packrunner.convert._match.refuse_fused_ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from packrunner.convert._match import TensorTypes
from packrunner.errors import ConversionError
from packrunner.graphs import (
    BLOCK_DIAGONAL_MARK,
    MASK_BIAS,
    GraphView,
    NodeEmitter,
    block_diagonal_bias,
    evaluate,
)

__all__ = [
    "AttentionOp",
    "attention_op_nodes",
    "find_attention_ops",
    "use_block_diagonal_bias_in_ops",
]

_MASK_INPUT = "attention_mask"
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})


@dataclass(frozen=True, slots=True)
class _Form:
    """Input slots of one attention op type."""

    bias: int  # the additive mask / attention_bias input
    padding: tuple[int, ...]  # inputs that only mark padding (dropped)
    state: tuple[int, ...]  # KV-cache inputs: present means a decoder


_FORMS: dict[tuple[str, str], _Form] = {
    ("", "Attention"): _Form(bias=3, padding=(), state=(4, 5)),
    ("com.microsoft", "Attention"): _Form(bias=5, padding=(3,), state=(4, 6)),
    ("com.microsoft", "MultiHeadAttention"): _Form(bias=5, padding=(4,), state=(6, 7)),
}


@dataclass(frozen=True, slots=True)
class AttentionOp:
    """One attention node whose additive mask input takes the block-diagonal bias.

    Attributes:
        node: The node's first output (names it).
        label: ``domain::op_type`` (for messages and ``--explain``).
        bias_slot: The additive mask input.
        padding_slots: Padding-mask inputs to drop.
        kept_mask: The exported mask to keep and add the bias to (one that reads no input), or
            None when the bias replaces it (or there was none).
        kept_mask_is_bool: Whether ``kept_mask`` is a bool mask (True = attend).
        elem_type: ONNX element type of the scores (the query's).
    """

    node: str
    label: str
    bias_slot: int
    padding_slots: tuple[int, ...]
    kept_mask: str | None
    kept_mask_is_bool: bool
    elem_type: int


def _label(domain: str, op_type: str) -> str:
    return f"{domain or 'ai.onnx'}::{op_type}"


def _form(node: onnx.NodeProto) -> _Form | None:
    return _FORMS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


def attention_op_nodes(view: GraphView) -> set[str]:
    """First outputs of the graph's attention ops of a form this module converts."""
    return {node.output[0] for node in view.graph.node if _form(node) is not None}


def find_attention_ops(
    model: onnx.ModelProto, view: GraphView, types: TensorTypes, *, seq_len: int
) -> list[AttentionOp]:
    """Every attention op of the graph that takes an additive mask, checked (nothing edited).

    Args:
        model: The model of ``view`` (its opsets, to compute masks).
        view: The export's graph.
        types: Its tensor types.
        seq_len: Tokens per row: masks are computed at this length (a band narrower than a
            probe row shows; one wider than ``seq_len`` never matters).

    Raises:
        ConversionError: An attention op has a KV cache, or a mask input that is neither a pure
            padding mask of ``attention_mask`` nor free of inputs, or a padding-mask input
            computed from anything but ``attention_mask``.
    """
    found: list[AttentionOp] = []
    for node in view.graph.node:
        form = _form(node)
        if form is None:
            continue
        label = _label(node.domain, node.op_type)
        where = f"{label} {node.name or node.output[0]!r}"
        present = {slot: name for slot, name in enumerate(node.input) if name}
        if any(slot in present for slot in form.state):
            raise ConversionError(
                f"{where} takes a KV cache (past key/value inputs): a decoder, not an encoder"
            )
        for slot in form.padding:
            if slot in present and view.value_deps(present[slot]) != {_MASK_INPUT}:
                raise ConversionError(
                    f"{where}: its padding mask (input {slot}) is not computed from "
                    f"{_MASK_INPUT} alone"
                )
        kept: str | None = None
        mask = present.get(form.bias)
        if mask is not None:
            deps = view.value_deps(mask)
            if deps and deps != {_MASK_INPUT}:
                raise ConversionError(
                    f"{where}: its attention mask (input {form.bias}) is computed from "
                    f"{sorted(deps)}; only a padding mask (from {_MASK_INPUT} alone) or a mask "
                    "that reads no input can be combined with the block-diagonal bias"
                )
            if deps and not _only_padding(model, view, mask, seq_len):
                raise ConversionError(
                    f"{where}: its attention mask (input {form.bias}) restricts attention beyond "
                    f"padding (a band or causal mask folded into the {_MASK_INPUT} mask); it "
                    "cannot be told apart from padding to combine it with the block-diagonal bias"
                )
            kept = None if deps else mask
        elem_type = types.elem_type(view, node.input[0])
        found.append(
            AttentionOp(
                node=node.output[0],
                label=label,
                bias_slot=form.bias,
                padding_slots=form.padding,
                kept_mask=kept,
                kept_mask_is_bool=kept is not None
                and types.elem_type(view, kept) == TensorProto.BOOL,
                elem_type=elem_type if elem_type in _FLOAT_TYPES else TensorProto.FLOAT,
            )
        )
    return found


def _only_padding(model: onnx.ModelProto, view: GraphView, mask: str, seq_len: int) -> bool:
    """Whether ``mask`` lets every query attend to every key of a ``seq_len`` row of no padding."""
    try:
        feeds = {
            value.name: np.ones(  # no padding; a valid id / type / position for every table
                [
                    dim.dim_value or size
                    for dim, size in zip(
                        value.type.tensor_type.shape.dim, (1, seq_len), strict=True
                    )
                ],
                helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type),
            )
            for value in view.graph.input
            if view.is_graph_input(value.name)
        }
        (value,) = evaluate(model, view, [mask], feeds)
    except Exception:  # a mask that does not compute alone is no mask we can vouch for
        return False
    array = np.asarray(value)
    return bool(array.all()) if array.dtype == np.bool_ else bool((array == 0).all())


def use_block_diagonal_bias_in_ops(
    view: GraphView, ops: Sequence[AttentionOp], *, opset: int
) -> set[str]:
    """Feed the segment-id bias into every op's additive mask input, dropping padding masks.

    Returns:
        The names of the nodes added.
    """
    emit = NodeEmitter(view, prefix="packrunner/attention_op_mask", opset=opset)
    biases: dict[int, str] = {}
    for op in ops:
        if op.elem_type not in biases:
            biases[op.elem_type] = block_diagonal_bias(emit, _MASK_INPUT, op.elem_type)
        bias = biases[op.elem_type]
        if op.kept_mask is not None:
            kept = op.kept_mask
            if op.kept_mask_is_bool:
                kept = emit.op(
                    "Where",
                    [
                        kept,
                        emit.typed_const(0.0, op.elem_type, "attend"),
                        emit.typed_const(MASK_BIAS, op.elem_type, "drop"),
                    ],
                    "kept_mask_additive",
                )
            bias = emit.op("Add", [kept, bias], "combined_mask")
        node = view.producer(op.node)
        assert node is not None  # found on this graph
        while len(node.input) <= op.bias_slot:
            node.input.append("")
        node.input[op.bias_slot] = bias
        for slot in op.padding_slots:
            if slot < len(node.input):
                node.input[slot] = ""
        while node.input and node.input[-1] == "":  # trailing optional inputs left empty
            node.input.pop()
        # OnnxDevice refuses fused attention unless it takes this bias (see the mark).
        node.metadata_props.add(key=BLOCK_DIAGONAL_MARK[0], value=BLOCK_DIAGONAL_MARK[1])
    view.graph.node.extend(emit.nodes)
    view.refresh()
    return {node.name for node in emit.nodes}
