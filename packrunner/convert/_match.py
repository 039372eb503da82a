"""Data-flow matchers of the converter: what an exported BERT graph holds, found before any edit.

Each finder reads a :class:`~packrunner.graphs.GraphView` and returns plain dataclasses that name
tensors (never ``NodeProto`` objects, which protobuf copies when the graph is re-sorted), or raises
:class:`~packrunner.errors.ConversionError` saying what it could not find. Nothing here edits the
graph; :mod:`packrunner.convert._rewrite` and :mod:`packrunner.convert._unpack` do.

The patterns are matched by data flow, not by node names:

* the position-embedding lookup is found and checked by
  :func:`packrunner.convert._match_positions.find_position_lookup`;
* the mask is, for every attention ``Softmax`` (one whose scores come from a ``MatMul`` of two
  computed tensors), the operand of the ``Add`` before it whose value depends on
  ``attention_mask`` and on no other input. Shape-only uses (``Shape``, ``Size``) do not count as
  value dependencies, which is what lets the same rule match the classic
  ``Unsqueeze-Unsqueeze-Cast-Sub-Mul`` mask, transformers 5's ``Where``/``Expand`` mask built from
  ``Shape(hidden_states)``, and the per-layer ``Where(mask, 0, -inf)`` of SDPA exports;
* the attention core of a layer (for unpack/repack) is found by
  :func:`packrunner.convert._match_cores.find_attention_cores`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import onnx
from onnx import TensorProto, helper

from packrunner.config import InputForm
from packrunner.devices.base import OutputLayout
from packrunner.errors import ConversionError
from packrunner.graphs import GraphView

__all__ = [
    "PACKED_INPUT_NAMES",
    "ExportInputs",
    "MaskSite",
    "OutputKind",
    "TensorTypes",
    "classify_outputs",
    "dims",
    "find_inputs",
    "find_mask_sites",
    "output_layout",
    "refuse_fused_ops",
]

logger = logging.getLogger("packrunner.convert")

#: The inputs of a converted model, in order; each is int32 ``[batch_size, seq_len]``.
PACKED_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

#: What an output holds: per token, per row (one sample per row only), or per sample (a
#: per-sequence head rewritten by :mod:`packrunner.convert._pooling`).
OutputKind = Literal["token", "row", "sample"]

# Ops the attention scores pass through between the QK^T MatMul and the Softmax in the exports we
# know (scale, mask add, dtype casts, head reshapes). The search for the mask Add only walks these.
_SCORE_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Reshape", "Transpose", "Where"})
_SCORE_PATH_DEPTH = 6
# Fused ops that hide the attention mask or the position lookup inside one node (ONNX opset 23
# ``Attention``, onnxruntime's transformer-optimizer fusions): refused by name, first.
_FUSED_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
        "GroupQueryAttention",
        "EmbedLayerNormalization",
    }
)
_FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
)
_INT_TYPES = frozenset({TensorProto.INT32, TensorProto.INT64})


def dims(value: onnx.ValueInfoProto) -> list[str | int | None] | None:
    """A value's dims as dim_param / dim_value / None (unknown); None if it has no shape."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    found: list[str | int | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            found.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            found.append(dim.dim_param)
        else:
            found.append(None)
    return found


class TensorTypes:
    """Element types and dims of a graph's tensors, from (non-strict) shape inference."""

    def __init__(self, model: onnx.ModelProto) -> None:
        """Infer over ``model``; a raw export may not fully infer, so nothing is required."""
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        graph = inferred.graph
        self.values = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}

    def elem_type(self, view: GraphView, name: str) -> int | None:
        """The element type of ``name``, from inference or its constant value."""
        value = self.values.get(name)
        if value is not None and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
        const = view.constant(name)
        if const is not None:
            return int(helper.np_dtype_to_tensor_dtype(const.dtype))
        return None

    def dims(self, name: str) -> list[str | int | None] | None:
        """Inferred dims of ``name`` (None if unknown)."""
        value = self.values.get(name)
        return None if value is None else dims(value)


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInputs:
    """The export's token inputs.

    Attributes:
        names: Its graph inputs (initializers excluded).
        batch_dim: ``input_ids``' batch axis as exported (a name, a size, or None).
        seq_dim: ``input_ids``' sequence axis as exported.
    """

    names: frozenset[str]
    batch_dim: str | int | None
    seq_dim: str | int | None


def find_inputs(view: GraphView) -> ExportInputs:
    """Check the export takes ``input_ids`` and ``attention_mask`` as int ``[batch, sequence]``."""
    inputs = {i.name: i for i in view.graph.input if view.is_graph_input(i.name)}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise ConversionError(
                f"graph input {name!r} not found (inputs: {sorted(inputs)}); expected a Hugging "
                "Face BERT export with input_ids, attention_mask[, token_type_ids]"
            )
    for name in PACKED_INPUT_NAMES:
        value = inputs.get(name)
        if value is None:
            continue
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in _INT_TYPES:
            raise ConversionError(
                f"graph input {name!r} has type "
                f"{helper.tensor_dtype_to_string(elem_type)}; expected int32 or int64"
            )
        found = dims(value)
        if found is not None and len(found) != 2:
            raise ConversionError(
                f"graph input {name!r} has rank {len(found)}; expected [batch, sequence]"
            )
    batch_dim, seq_dim = dims(inputs["input_ids"]) or [None, None]
    return ExportInputs(frozenset(inputs), batch_dim, seq_dim)


def refuse_fused_ops(view: GraphView, handled: Collection[str] = ()) -> None:
    """Refuse, naming them, fused attention / embedding ops (before any other finder runs).

    Args:
        view: The export's graph.
        handled: First outputs of the attention ops that take the block-diagonal bias as an
            additive mask (:mod:`packrunner.convert._attention_ops`): not refused.
    """
    fused = sorted(
        {
            f"{n.domain or 'ai.onnx'}::{n.op_type}"
            for n in view.graph.node
            if n.op_type in _FUSED_OPS and n.output[0] not in handled
        }
    )
    if fused:
        raise ConversionError(
            f"the graph uses fused ops {fused}: their attention mask (or position lookup) is "
            "inside one node that takes no additive mask the converter could feed; convert the "
            "export before fusing (onnxruntime's transformer optimizer: without "
            "EmbedLayerNormalization fusion, which hides the position lookup)"
        )


# -- attention mask -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaskSite:
    """One place where the exported mask is added to attention scores.

    Attributes:
        add: Output of the ``Add`` (names the node).
        operand: Which input of the ``Add`` is the mask.
        softmax: Output of the attention ``Softmax`` the masked scores feed.
        elem_type: ONNX element type of a replacement bias: the old mask's (float16 exports stay
            float16).
    """

    add: str
    operand: int
    softmax: str
    elem_type: int


def find_mask_sites(
    view: GraphView, types: TensorTypes, *, required: bool = True
) -> list[MaskSite]:
    """One :class:`MaskSite` per attention Softmax; fails if any Softmax has none.

    With ``required=False`` (the graph's attention is in attention ops), a graph without an
    attention Softmax has no sites instead of failing.
    """
    softmaxes = [
        n
        for n in view.graph.node
        if n.op_type == "Softmax" and n.domain in ("", "ai.onnx") and _is_attention(view, n)
    ]
    if not softmaxes and not required:
        return []
    if not softmaxes:
        raise ConversionError(
            "attention mask subgraph not found: no attention Softmax (a Softmax over "
            "MatMul(Q, K^T) scores) in the graph; fused attention ops are not supported"
        )
    sites = []
    for softmax in softmaxes:
        site = _mask_site(view, types, softmax)
        if site is None:
            raise ConversionError(
                f"attention mask subgraph not found: nothing that depends only on "
                f"attention_mask is added to the scores before Softmax "
                f"{softmax.name or softmax.output[0]!r}"
            )
        sites.append(site)
    logger.info(
        "attention mask added before %d Softmax nodes: %s",
        len(sites),
        [s.softmax for s in sites],
    )
    return sites


def _score_path(view: GraphView, tensor: str) -> list[onnx.NodeProto]:
    """Producers along the score path of ``tensor``, nearest first, bounded in depth."""
    path: list[onnx.NodeProto] = []
    frontier = [(tensor, 0)]
    seen: set[int] = set()
    while frontier:
        name, depth = frontier.pop(0)
        node = view.producer(name)
        if node is None or id(node) in seen or depth > _SCORE_PATH_DEPTH:
            continue
        seen.add(id(node))
        path.append(node)
        if node.op_type in _SCORE_PATH_OPS:
            frontier.extend((i, depth + 1) for i in node.input if i and view.constant(i) is None)
    return path


def _is_attention(view: GraphView, softmax: onnx.NodeProto) -> bool:
    """A Softmax over scores that come from a MatMul of two computed tensors (Q @ K^T)."""
    return any(
        node.op_type == "MatMul" and all(view.constant(i) is None for i in node.input)
        for node in _score_path(view, softmax.input[0])
    )


def _mask_site(view: GraphView, types: TensorTypes, softmax: onnx.NodeProto) -> MaskSite | None:
    mask_only = frozenset({"attention_mask"})
    for node in _score_path(view, softmax.input[0]):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        deps = [view.value_deps(i) for i in node.input]
        for operand in (0, 1):
            if deps[operand] == mask_only and not deps[1 - operand] <= mask_only:
                elem_type = types.elem_type(view, node.input[operand]) or types.elem_type(
                    view, node.input[1 - operand]
                )
                return MaskSite(
                    add=node.output[0],
                    operand=operand,
                    softmax=softmax.output[0],
                    elem_type=elem_type if elem_type in _FLOAT_TYPES else TensorProto.FLOAT,
                )
    return None


# -- outputs ------------------------------------------------------------------------------------


def classify_outputs(
    view: GraphView, types: TensorTypes, inputs: ExportInputs
) -> dict[str, OutputKind]:
    """Each output as per token (``[batch, seq, ...]``) or per row (``[batch, ...]``)."""
    kinds: dict[str, OutputKind] = {}
    for output in view.graph.output:
        found = dims(output) or types.dims(output.name)
        if found is None or inputs.batch_dim is None or not found or found[0] != inputs.batch_dim:
            raise ConversionError(
                f"cannot tell the layout of output {output.name!r} (dims {found}); expected "
                f"[{inputs.batch_dim}, {inputs.seq_dim}, ...] as in input_ids"
            )
        kinds[output.name] = "token" if len(found) >= 2 and found[1] == inputs.seq_dim else "row"
    return kinds


def output_layout(kind: OutputKind, form: InputForm) -> OutputLayout:
    """The :class:`~packrunner.OutputLayout` of a converted output of ``kind`` in ``form``."""
    unpack = form is InputForm.UNPACK_REPACK
    if kind == "token":
        return OutputLayout.SAMPLE_TOKENS if unpack else OutputLayout.PACKED_TOKENS
    if kind == "sample":
        return OutputLayout.SAMPLES if unpack else OutputLayout.SEGMENTS
    return OutputLayout.ROWS
