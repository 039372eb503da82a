"""Data-flow matchers of the converter: what an exported BERT graph holds, found before any edit.

Each finder reads a :class:`~packrunner.graphs.GraphView` and returns plain dataclasses that name
tensors (never ``NodeProto`` objects, which protobuf copies when the graph is re-sorted), or raises
:class:`~packrunner.errors.ConversionError` saying what it could not find. Nothing here edits the
graph; :mod:`packrunner.convert._rewrite` and :mod:`packrunner.convert._unpack` do.

The patterns are matched by data flow, not by node names:

* the position-embedding ``Gather`` is the ``Gather`` over a constant ``[positions, hidden]`` table
  whose indices depend on no graph input's values and come from a ``Range`` or an arange-valued
  constant (the ``position_ids`` buffer);
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
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from packrunner.errors import ConversionError
from packrunner.graphs import GraphView

__all__ = [
    "PACKED_INPUT_NAMES",
    "ExportInputs",
    "MaskSite",
    "OutputKind",
    "PositionLookup",
    "TensorTypes",
    "classify_outputs",
    "dims",
    "find_inputs",
    "find_mask_sites",
    "find_position_lookup",
]

logger = logging.getLogger("packrunner.convert")

#: The inputs of a converted model, in order; each is int32 ``[batch_size, seq_len]``.
PACKED_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

OutputKind = Literal["token", "row"]

# Ops the attention scores pass through between the QK^T MatMul and the Softmax in the exports we
# know (scale, mask add, dtype casts, head reshapes). The search for the mask Add only walks these.
_SCORE_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Reshape", "Transpose", "Where"})
_SCORE_PATH_DEPTH = 6
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


# -- position ids -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PositionLookup:
    """The position-embedding ``Gather``, whose indices become the ``position_ids`` input.

    Attributes:
        gather: The Gather's output (names the node).
        table: The constant ``[max_positions, hidden]`` table it reads.
    """

    gather: str
    table: str


def find_position_lookup(view: GraphView, seq_len: int) -> PositionLookup:
    """The one position-embedding ``Gather``; it must have at least ``seq_len`` rows."""
    candidates: list[onnx.NodeProto] = []
    for node in view.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = view.constant(node.input[0])
        if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            continue
        indices = node.input[1]
        if view.value_deps(indices):
            continue  # word / token-type embeddings: indices come from the inputs
        if _looks_like_positions(view, indices):
            candidates.append(node)
    if not candidates:
        raise ConversionError(
            "no position-embedding Gather found: expected a Gather over a constant "
            "[max_positions, hidden] table whose indices come from a Range or a position_ids "
            "buffer (Slice/Expand of an arange constant) and not from input_ids, "
            "token_type_ids or attention_mask"
        )
    if len(candidates) > 1:
        names = [n.name or n.output[0] for n in candidates]
        raise ConversionError(f"several position-embedding Gather candidates found: {names}")
    gather = candidates[0]
    rows = view.constant(gather.input[0])
    assert rows is not None  # checked above
    if seq_len > rows.shape[0]:
        raise ConversionError(
            f"seq_len {seq_len} exceeds the {rows.shape[0]} rows of the "
            f"position-embedding table {gather.input[0]!r}"
        )
    logger.info("position-embedding Gather: %r", gather.name or gather.output[0])
    return PositionLookup(gather=gather.output[0], table=gather.input[0])


def _looks_like_positions(view: GraphView, indices: str) -> bool:
    """Whether constant-only indices are positions: a Range, or an arange-valued buffer.

    This is what tells the position Gather from a token-type Gather fed by a constant zeros
    buffer (exports made without a token_type_ids input).
    """
    value = view.constant(indices)
    if value is not None:
        return _is_arange(value)
    for node in view.ancestors(indices):
        if node.op_type == "Range":
            return True
        for name in node.input:
            const = view.constant(name) if name else None
            if const is not None and const.size > 1 and _is_arange(const):
                return True
    return False


def _is_arange(value: npt.NDArray[np.generic]) -> bool:
    """Whether every 1-D slice along the last axis is 0, 1, 2, ... (a position_ids buffer)."""
    if value.ndim == 0 or value.shape[-1] < 2 or not np.issubdtype(value.dtype, np.integer):
        return False
    rows = value.reshape(-1, value.shape[-1])
    return bool(np.all(rows == np.arange(value.shape[-1], dtype=rows.dtype)))


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


def find_mask_sites(view: GraphView, types: TensorTypes) -> list[MaskSite]:
    """One :class:`MaskSite` per attention Softmax; fails if any Softmax has none."""
    softmaxes = [
        n
        for n in view.graph.node
        if n.op_type == "Softmax" and n.domain in ("", "ai.onnx") and _is_attention(view, n)
    ]
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
