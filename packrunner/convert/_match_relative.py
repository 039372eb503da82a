"""Row-invariant position encodings: relative-position buckets and rotary angles, checked.

In a packed row the samples are contiguous, so two tokens of one sample are as far apart in the
row as in the sample alone; across samples the block-diagonal bias masks attention anyway. A
position encoding that reaches the attention scores only through the distance ``i - j`` is
therefore correct on the whole row as exported, and its position range needs no rewrite:

* **relative buckets** (DeBERTa-v2/v3's c2p / p2c, MPNet's bucketed bias): a ``Gather`` or
  ``GatherElements`` whose indices are computed from shapes alone (no input's values) and,
  evaluated at two lengths ``n``, form an ``[n, n]`` grid constant along each diagonal
  (``index[i, j]`` a function of ``i - j`` only: no absolute term);
* **rotary** (ModernBERT): ``Sin`` / ``Cos`` of angles computed from shapes alone that,
  evaluated at two lengths, are ``position * frequency`` (row ``p`` is ``p`` times row 1, row 0
  is zero). Rotating Q and K by such angles makes ``q_i . k_j`` depend on ``i - j`` only.

Both are found by data flow and then checked by computing them
(:func:`packrunner.graphs.evaluate`), never by node names; whatever passes, the converter's
self-check still compares the packed outputs with the original run on each sample alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx

from packrunner.convert._match_positions import EmbeddingSum, PositionKind
from packrunner.graphs import GraphView, evaluate

__all__ = ["RowInvariantPositions", "find_row_invariant_positions"]

logger = logging.getLogger("packrunner.convert")

_PROBE_LENGTHS = (5, 7)
_GATHERS = frozenset({"Gather", "GatherElements"})
_ANGLES = frozenset({"Sin", "Cos"})
# Rotary angles are float32 products: row p must be p * row 1 to this relative precision.
_ANGLE_RTOL = 1e-5
# How far a sinusoid summed into the embeddings (absolute positions) may be from the sum.
_REACH_DEPTH = 4


@dataclass(frozen=True, slots=True)
class RowInvariantPositions:
    """Position encodings that depend on ``i - j`` only, so they stay valid on a packed row.

    Attributes:
        kind: :attr:`PositionKind.ROTARY` if rotary angles were found, else
            :attr:`PositionKind.RELATIVE`.
        relative: Outputs of the relative-bucket gathers.
        rotary: Outputs of the rotary ``Sin`` / ``Cos`` nodes.
        offset: Always 0 (there is no table row to offset).
        pad_token: Always None (the positions read no token ids).
    """

    kind: PositionKind
    relative: tuple[str, ...]
    rotary: tuple[str, ...]
    offset: int = 0
    pad_token: int | None = None

    def notes(self) -> list[str]:
        """One ``--explain`` line per kind found."""
        found = []
        if self.relative:
            found.append(
                f"positions: relative buckets (row-invariant): {_count(self.relative, 'gather')} "
                "whose indices depend on i - j only (checked at lengths "
                f"{list(_PROBE_LENGTHS)}); the row's position range is kept, distances within a "
                "segment equal the sample's own"
            )
        if self.rotary:
            found.append(
                f"positions: rotary (row-invariant): {_count(self.rotary, 'Sin/Cos node')} "
                "of angles position * frequency (checked at lengths "
                f"{list(_PROBE_LENGTHS)}); q_i . k_j depends on i - j only, the row's position "
                "range is kept"
            )
        return found


def _count(names: tuple[str, ...], what: str) -> str:
    return f"{len(names)} {what}" + ("" if len(names) == 1 else "s")


def find_row_invariant_positions(
    model: onnx.ModelProto, view: GraphView, embeddings: EmbeddingSum
) -> RowInvariantPositions | None:
    """The relative-bucket gathers and rotary angles of ``view``, checked; None if neither.

    Args:
        model: The model of ``view`` (its opsets, for evaluation).
        view: The export's graph (dynamic ``[batch, sequence]`` inputs).
        embeddings: Its embedding sum: sinusoids summed into it are absolute positions, not
            rotary ones, and are never taken for row-invariant.
    """
    relative = [
        node.output[0]
        for node in _shape_computed(view, _GATHERS, slot=1)
        if _is_toeplitz(model, view, node.input[1])
    ]
    rotary = [
        node.output[0]
        for node in _shape_computed(view, _ANGLES, slot=0)
        if not _reaches(view, node.output[0], embeddings.adds)
        and _is_linear_in_position(model, view, node.input[0])
    ]
    if not relative and not rotary:
        return None
    kind = PositionKind.ROTARY if rotary else PositionKind.RELATIVE
    logger.info(
        "row-invariant positions: %d relative gathers, %d rotary", len(relative), len(rotary)
    )
    return RowInvariantPositions(kind, tuple(relative), tuple(rotary))


def _shape_computed(view: GraphView, ops: frozenset[str], *, slot: int) -> Iterator[onnx.NodeProto]:
    """Nodes of ``ops`` whose input ``slot`` is computed (not constant) from shapes alone."""
    for node in view.graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx") or len(node.input) <= slot:
            continue
        name = node.input[slot]
        if view.constant(name) is None and not view.value_deps(name):
            yield node


def _reaches(view: GraphView, tensor: str, targets: frozenset[str]) -> bool:
    """Whether ``tensor``'s values flow into one of ``targets`` within a few nodes."""
    frontier = [tensor]
    for _ in range(_REACH_DEPTH):
        frontier = [o for t in frontier for n in view.consumers(t) for o in n.output if o]
        if targets.intersection(frontier):
            return True
    return False


def _probe(
    model: onnx.ModelProto, view: GraphView, tensor: str, length: int
) -> npt.NDArray[np.generic] | None:
    """``tensor`` computed for one row of ``length`` tokens (None if that part does not run)."""
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for graph_input in view.graph.input:
        if view.is_graph_input(graph_input.name):
            elem_type = graph_input.type.tensor_type.elem_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
            feeds[graph_input.name] = np.ones((1, length), dtype=dtype)
    try:
        (value,) = evaluate(model, view, [tensor], feeds)
    except Exception:  # not computable alone: not a match we can check
        logger.debug("position candidate %r did not evaluate", tensor, exc_info=True)
        return None
    return np.asarray(value)


def _is_toeplitz(model: onnx.ModelProto, view: GraphView, indices: str) -> bool:
    """Indices whose last two axes are ``[n, n]`` and constant along every diagonal."""
    for length in _PROBE_LENGTHS:
        grid = _probe(model, view, indices, length)
        if grid is None or grid.ndim < 2 or grid.shape[-2:] != (length, length):
            return False
        if not np.issubdtype(grid.dtype, np.integer):
            return False
        if not np.array_equal(grid[..., 1:, 1:], grid[..., :-1, :-1]):
            return False
        if np.all(grid == grid.reshape(-1)[0]):
            return False  # one value everywhere: no positions at all
    return True


def _is_linear_in_position(model: onnx.ModelProto, view: GraphView, angles: str) -> bool:
    """Angles with one axis of the probe length along which row ``p`` is ``p`` times row 1."""
    for length in _PROBE_LENGTHS:
        values = _probe(model, view, angles, length)
        if values is None or not np.issubdtype(values.dtype, np.floating):
            return False
        axes = [a for a, size in enumerate(values.shape) if size == length]
        if len(axes) != 1:
            return False
        rows = np.moveaxis(values, axes[0], 0).astype(np.float64)
        expected = np.arange(length).reshape(-1, *([1] * (rows.ndim - 1))) * rows[1]
        if not rows[1].any() or not np.allclose(rows, expected, rtol=_ANGLE_RTOL, atol=0.0):
            return False
    return True
