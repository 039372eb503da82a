"""Attention masks beyond a padding bias: the ``Where`` form, banded masks, token-wise mask reads.

The converter's packed rewrite puts the block-diagonal bias of the segment ids where the export
adds its padding mask to the scores (:func:`packrunner.convert._match.find_mask_sites`). Three
export shapes need more than that, each handled here:

* **masked_fill** (DeBERTa): ``Where(not mask, finfo.min, scores)`` instead of an ``Add``.
  :func:`additive_where_masks` rewrites it, before the finders run, into
  ``Add(scores, Where(not mask, MASK_BIAS, 0))``: a masked key gets weight exactly 0 either way,
  so every query with an allowed key gets the same result; a query with none (padding) gets a
  finite row either way. The one mask-site finder then matches it.
* **a band in the same operand** (ModernBERT's sliding-window layers): the operand that depends on
  ``attention_mask`` also holds ``-inf`` outside ``|i - j| <= window / 2``. Replacing it would
  drop the band; :func:`find_mask_structure` computes the operand with a mask of ones (what is
  left is the part that does not come from the mask: the band), and :func:`add_mask_structure`
  adds it back to the new bias. The band is relative, hence as valid within a packed segment as
  in the sample alone. Its ``-inf`` is clamped to :data:`~packrunner.graphs.MASK_BIAS`, so a
  padding query (whose segment bias blocks every key) still sees a finite row.
* **token-wise reads** (DeBERTa multiplies its embeddings and layer outputs by the mask): once
  the attention sites read segment ids, any other reader of ``attention_mask``'s values gets the
  0/1 mask ``segment_ids > 0`` it was written for (:func:`binary_mask_reads`).

Whatever is rewritten, the converter's self-check compares the result with the original run on
each sample alone and refuses a mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper

from packrunner.convert._match import MaskSite
from packrunner.graphs import MASK_BIAS, GraphView, NodeEmitter, evaluate

__all__ = [
    "additive_where_masks",
    "add_mask_structure",
    "binary_mask_reads",
    "find_mask_structure",
]

logger = logging.getLogger("packrunner.convert")

_MASK_ONLY = frozenset({"attention_mask"})
# A fill at or below this is a mask value (finfo.min, -inf, -1e4 ...), not a score.
_FILL_AT_MOST = MASK_BIAS
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def additive_where_masks(view: GraphView, *, opset: int) -> int:
    """Rewrite ``Where(mask cond, fill, scores)`` as ``Add(scores, Where(cond, MASK_BIAS, 0))``.

    Only a ``Where`` feeding a ``Softmax`` (through casts), whose condition depends on
    ``attention_mask`` alone and whose other branch is a large negative scalar constant.

    Returns:
        How many were rewritten.
    """
    emit = NodeEmitter(view, prefix="packrunner/additive_mask", opset=opset)
    rewritten = 0
    for node in list(view.graph.node):
        if node.op_type != "Where" or not _feeds_softmax(view, node.output[0]):
            continue
        cond, first, second = node.input
        if view.value_deps(cond) != _MASK_ONLY:
            continue
        for fill_slot, scores in ((1, second), (2, first)):
            fill = view.constant(node.input[fill_slot])
            if fill is None or fill.size != 1 or not float(fill.reshape(())) <= _FILL_AT_MOST:
                continue
            if view.value_deps(scores) <= _MASK_ONLY:
                continue
            zero = emit.const(np.zeros((), fill.dtype), fill.dtype, "zero")
            # finfo.min added to a score could overflow to -inf (fp16): a fully masked row would
            # then be NaN, not uniform. MASK_BIAS still gives masked keys weight exactly 0.
            bias_value = emit.const(MASK_BIAS, fill.dtype, "mask_bias")
            branches = [bias_value, zero] if fill_slot == 1 else [zero, bias_value]
            bias = emit.op("Where", [cond, *branches], "bias")
            node.op_type = "Add"
            del node.input[:]
            node.input.extend([scores, bias])
            rewritten += 1
            break
    view.graph.node.extend(emit.nodes)
    view.refresh()
    view.toposort()
    return rewritten


def _feeds_softmax(view: GraphView, tensor: str) -> bool:
    for _ in range(3):
        readers = view.consumers(tensor)
        if any(r.op_type == "Softmax" for r in readers):
            return True
        casts = [r for r in readers if r.op_type == "Cast"]
        if len(casts) != 1:
            return False
        tensor = casts[0].output[0]
    return False


def _applied_to_tokens(view: GraphView, reader: onnx.NodeProto) -> bool:
    outputs = {o.name for o in view.graph.output}
    frontier = [o for o in reader.output if o]
    seen: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen or view.value_deps(tensor) - _MASK_ONLY:
            continue  # combined with token data from here on
        if tensor in outputs:
            return False
        seen.add(tensor)
        frontier.extend(o for n in view.consumers(tensor) for o in n.output if o)
    return True


def find_mask_structure(
    model: onnx.ModelProto, view: GraphView, sites: Sequence[MaskSite], *, seq_len: int
) -> dict[str, npt.NDArray[np.generic]]:
    """Per site (by ``add``), the part of its mask operand that is not from ``attention_mask``.

    Computed with a mask of ones on one row of ``seq_len`` tokens (or the export's own static
    shape, if it has one); clamped to ``MASK_BIAS``. Sites whose operand is then all zero (a
    plain padding mask) are left out.
    """
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for graph_input in view.graph.input:
        if view.is_graph_input(graph_input.name):
            tensor_type = graph_input.type.tensor_type
            static = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim]
            rows, length = static if len(static) == 2 else (0, 0)
            dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            feeds[graph_input.name] = np.ones((rows or 1, length or seq_len), dtype=dtype)
    operands = []
    for site in sites:
        add = view.producer(site.add)
        assert add is not None  # found on this graph
        operands.append(add.input[site.operand])
    values = evaluate(model, view, operands, feeds) if operands else []
    structure: dict[str, npt.NDArray[np.generic]] = {}
    for site, value in zip(sites, values, strict=True):
        array = np.asarray(value)
        if not array.any():
            continue
        structure[site.add] = np.maximum(array, MASK_BIAS).astype(array.dtype)
    if structure:
        logger.info("mask operands with a band of their own at %s", sorted(structure))
    return structure


def add_mask_structure(
    view: GraphView,
    sites: Sequence[MaskSite],
    structure: Mapping[str, npt.NDArray[np.generic]],
    *,
    opset: int,
) -> None:
    """Add each site's structure (:func:`find_mask_structure`) to whatever bias it reads now."""
    emit = NodeEmitter(view, prefix="packrunner/mask_band", opset=opset)
    for site in sites:
        band = structure.get(site.add)
        if band is None:
            continue
        add = view.producer(site.add)
        assert add is not None  # found on this graph
        band_name = emit.const(band, band.dtype, "band")
        add.input[site.operand] = emit.op("Add", [add.input[site.operand], band_name], "banded")
    view.graph.node.extend(emit.nodes)
    view.refresh()


def binary_mask_reads(view: GraphView, ours: Collection[str], *, opset: int) -> set[str]:
    """Feed the other readers of ``attention_mask`` that mask tokens the 0/1 ``segment ids > 0``.

    A reader masks tokens when whatever it computes from the mask alone reaches the outputs only
    combined with token data (DeBERTa's ``embeddings * mask``); one whose mask-only values are
    an output themselves is left alone, for :func:`~._rewrite.require_mask_replaced` to refuse.

    Returns:
        The names of the nodes added (they read the int32 segment ids as they are).
    """
    readers = [
        n
        for n in view.consumers("attention_mask")
        if n.name not in ours and n.op_type not in _SHAPE_ONLY and _applied_to_tokens(view, n)
    ]
    if not readers:
        return set()
    value = next(i for i in view.graph.input if i.name == "attention_mask")
    elem_type = value.type.tensor_type.elem_type or TensorProto.INT64
    emit = NodeEmitter(view, prefix="packrunner/binary_mask", opset=opset)
    is_token = emit.op("Greater", ["attention_mask", emit.const(0, np.int32, "zero")], "is_token")
    binary = emit.op("Cast", [is_token], "mask", to=elem_type)
    for node in readers:
        for slot, name in enumerate(node.input):
            if name == "attention_mask":
                node.input[slot] = binary
    view.graph.node.extend(emit.nodes)
    view.refresh()
    logger.info("attention_mask as a 0/1 mask now feeds %s", [n.name for n in readers])
    return {node.name for node in emit.nodes}
