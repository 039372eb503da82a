"""The position lookup of an exported encoder: found by data flow, then checked by computing it.

Only one table is ever rewritten: the position-embedding ``Gather`` that is *summed into the
embeddings*. Every other table (token types, MPNet's relative-attention bias buckets, anything
else indexed by something position-like) is left alone. The lookup must satisfy all of:

* it is a ``Gather`` (axis 0) over a constant float ``[rows, width]`` table whose ``width`` equals
  the hidden size (the width of the word-embedding table, the ``Gather`` indexed by
  ``input_ids`` itself);
* its output is an operand of the embedding sum (the chain of ``Add`` nodes that starts at the
  word-embedding ``Gather``);
* its indices, *computed* on probe inputs of two lengths (:func:`packrunner.graphs.evaluate`),
  are ``offset + 0, 1, 2 ...`` per row, or they are the export's own ``position_ids`` input.

What the indices are computed from gives the :class:`PositionKind`: a range (BERT, ELECTRA,
ALBERT, DistilBERT: offset 0), ``cumsum(input_ids != pad) + pad`` (RoBERTa, XLM-RoBERTa,
CamemBERT, MPNet: offset ``pad + 1``), or an input.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx

from packrunner.errors import ConversionError
from packrunner.graphs import GraphView, evaluate

__all__ = [
    "EmbeddingSum",
    "PositionKind",
    "PositionLookup",
    "find_embedding_sum",
    "find_position_lookup",
]

logger = logging.getLogger("packrunner.convert")

_PROBE_LENGTHS = (2, 5)
_STANDARD = ("", "ai.onnx")
# Ops that pass an index tensor through unchanged in value (a graph input read as indices).
_PASS_THROUGH = frozenset({"Cast", "Identity"})
# An all-zero table row this close to the start is nn.Embedding's padding_idx row.
_MAX_PADDING_ROW = 4


class PositionKind(enum.Enum):
    """How an export computes the position-table rows it reads.

    Attributes:
        RANGE: ``0 .. L-1`` from a ``Range`` or a ``position_ids`` buffer (BERT family).
        PADDING_OFFSET: ``cumsum(input_ids != pad) + pad`` (RoBERTa family, MPNet): a sample's
            first token reads row ``pad + 1``.
        INPUT: the export takes ``position_ids`` as an input.
        RELATIVE: no table; relative-position buckets of ``i - j`` only (DeBERTa-v2/v3), see
            :mod:`packrunner.convert._match_relative`.
        ROTARY: no table; rotary angles of the position (ModernBERT), ditto.
    """

    RANGE = "range"
    PADDING_OFFSET = "padding_offset"
    INPUT = "input"
    RELATIVE = "relative"
    ROTARY = "rotary"


@dataclass(frozen=True, slots=True)
class EmbeddingSum:
    """The word-embedding lookup and the ``Add`` chain that sums the embeddings onto it.

    Attributes:
        word_gather: Output of the ``Gather`` indexed by ``input_ids``.
        vocab_size: Rows of the word-embedding table.
        hidden: Its width (every summed table must have it).
        adds: Outputs of the ``Add`` nodes of the sum.
    """

    word_gather: str
    vocab_size: int
    hidden: int
    adds: frozenset[str]


@dataclass(frozen=True, slots=True)
class PositionLookup:
    """The position-embedding ``Gather`` whose indices become ``offset + position_ids``.

    Attributes:
        gather: The Gather's output (names the node).
        table: The constant ``[rows, hidden]`` table it reads.
        rows: The table's rows.
        kind: What the export computes the indices from.
        offset: The table row of a sample's first token (the converted graph adds it to its
            0-based ``position_ids`` input).
        pad_token: The ``input_ids`` value the export treats as padding (``PADDING_OFFSET``),
            else None.
        reason: How the offset was established (for ``--explain``).
    """

    gather: str
    table: str
    rows: int
    kind: PositionKind
    offset: int
    pad_token: int | None
    reason: str


def find_embedding_sum(view: GraphView) -> EmbeddingSum:
    """The word-embedding ``Gather`` (indices: ``input_ids`` itself) and its ``Add`` chain."""
    words = [
        node
        for node in view.graph.node
        if _table_of(view, node) is not None and _source_input(view, node.input[1]) == "input_ids"
    ]
    if not words:
        raise ConversionError(
            "no word-embedding lookup found: expected a Gather over a constant [vocab, hidden] "
            "table indexed by input_ids"
        )
    # Another table indexed by input_ids itself is no word table of a known encoder; the largest
    # is the vocabulary, and whatever the other is, it is never taken for positions (its indices
    # are token ids, not 0..L-1).
    word = max(words, key=lambda node: _row_count(view, node))
    table = _table_of(view, word)
    assert table is not None  # filtered above
    adds: set[str] = set()
    frontier = [word.output[0]]
    while frontier:
        name = frontier.pop()
        for node in view.consumers(name):
            if node.op_type == "Add" and node.domain in _STANDARD and node.output[0] not in adds:
                adds.add(node.output[0])
                frontier.append(node.output[0])
    return EmbeddingSum(word.output[0], int(table.shape[0]), int(table.shape[1]), frozenset(adds))


def find_position_lookup(
    model: onnx.ModelProto,
    view: GraphView,
    embeddings: EmbeddingSum,
    *,
    seq_len: int,
    position_offset: int | None = None,
    absent_ok: bool = False,
) -> PositionLookup | None:
    """The one position lookup of the embedding sum, its kind and offset, checked by evaluation.

    Args:
        model: The model of ``view`` (its opsets, for evaluating the indices).
        view: The export's graph.
        embeddings: Its embedding sum.
        seq_len: Tokens per row: ``offset + seq_len`` must not exceed the table's rows.
        position_offset: The table row of a sample's first token, for exports that take a
            ``position_ids`` input (which carry no trace of it). None: 0, or ``r + 1`` when row
            ``r < 4`` of the table is all zeros (``nn.Embedding``'s padding row, as in
            RoBERTa-family checkpoints). For other kinds it must match what is found.
        absent_ok: Return None instead of failing when no table is summed into the embeddings
            (the positions are relative or rotary, found elsewhere).

    Raises:
        ConversionError: No lookup, or more than one, satisfies every check; or the table is too
            short for ``seq_len``; or ``position_offset`` contradicts the export.
    """
    found: list[PositionLookup] = []
    rejected: list[str] = []
    for node in view.graph.node:
        table = _table_of(view, node)
        if table is None or node.output[0] == embeddings.word_gather:
            continue
        name = node.name or node.output[0]
        if not any(c.output[0] in embeddings.adds for c in view.consumers(node.output[0])):
            continue  # not summed into the embeddings (e.g. a relative-attention bias table)
        if table.shape[1] != embeddings.hidden:
            rejected.append(f"{name}: width {table.shape[1]} != hidden {embeddings.hidden}")
            continue
        lookup = _classify(model, view, node, int(table.shape[0]), embeddings, position_offset)
        if lookup is None:
            rejected.append(f"{name}: indices are not positions")
        else:
            found.append(lookup)
    if not found and absent_ok:
        return None
    if not found:
        raise ConversionError(
            "no position-embedding lookup found: expected a Gather over a constant "
            f"[positions, {embeddings.hidden}] table, summed into the word embeddings, whose "
            "indices are 0..L-1 (a Range or position buffer), cumsum(input_ids != pad) + pad "
            "(RoBERTa family) or a position_ids input"
            + (f"; summed tables that are not: {rejected}" if rejected else "")
            + " (nor relative-position buckets or rotary angles of i - j only)"
        )
    if len(found) > 1:
        raise ConversionError(
            f"several position-embedding lookups summed into the embeddings: "
            f"{[f.gather for f in found]}"
        )
    lookup = found[0]
    if position_offset is not None and position_offset != lookup.offset:
        raise ConversionError(
            f"position_offset={position_offset} contradicts the export, whose positions start at "
            f"table row {lookup.offset} ({lookup.reason})"
        )
    if lookup.offset + seq_len > lookup.rows:
        raise ConversionError(
            f"seq_len {seq_len} exceeds the {lookup.rows} rows of the position-embedding table "
            f"{lookup.table!r}"
            + (f" from its first position row {lookup.offset}" if lookup.offset else "")
        )
    logger.info(
        "position lookup %r: kind %s, offset %d (%s)",
        lookup.gather,
        lookup.kind.value,
        lookup.offset,
        lookup.reason,
    )
    return lookup


def _table_of(view: GraphView, node: onnx.NodeProto) -> npt.NDArray[np.generic] | None:
    """The constant float 2-D table an axis-0 ``Gather`` reads, else None."""
    if node.op_type != "Gather" or node.domain not in _STANDARD:
        return None
    if next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
        return None
    table = view.constant(node.input[0])
    if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        return None
    return table


def _row_count(view: GraphView, node: onnx.NodeProto) -> int:
    table = _table_of(view, node)
    return 0 if table is None else int(table.shape[0])


def _source_input(view: GraphView, name: str) -> str | None:
    """The graph input ``name`` is (through Casts / Identities), else None."""
    while not view.is_graph_input(name):
        node = view.producer(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return name


def _classify(
    model: onnx.ModelProto,
    view: GraphView,
    gather: onnx.NodeProto,
    rows: int,
    embeddings: EmbeddingSum,
    position_offset: int | None,
) -> PositionLookup | None:
    indices = gather.input[1]
    table = gather.input[0]
    if _source_input(view, indices) == "position_ids":
        offset, reason = _input_offset(view, table, position_offset)
        return PositionLookup(
            gather.output[0], table, rows, PositionKind.INPUT, offset, None, reason
        )
    deps = view.value_deps(indices)
    if not deps <= {"input_ids"}:
        return None  # token types, or anything else read from an input
    pads = _compared_tokens(view, indices)
    batch, length_dim = _input_dims(view)
    offsets = set()
    for length in (length_dim,) if length_dim else _PROBE_LENGTHS:
        feeds = _probe_feeds(view, batch, length, embeddings.vocab_size, pads)
        try:
            (value,) = evaluate(model, view, [indices], feeds)
        except Exception:  # the part does not run alone: not a lookup we can check
            logger.debug("position candidate %r did not evaluate", gather.output[0], exc_info=True)
            return None
        grid = np.asarray(value).reshape(-1, length) if np.size(value) else None
        if grid is None or not np.issubdtype(grid.dtype, np.integer):
            return None
        start = grid[:, :1]
        if not np.array_equal(grid, start + np.arange(length)) or np.any(start != start[0, 0]):
            return None
        offsets.add(int(start[0, 0]))
    if len(offsets) != 1:
        return None
    offset = offsets.pop()
    if not deps:
        if offset != 0:
            return None
        reason = "indices computed as 0..L-1 without reading input_ids"
        return PositionLookup(gather.output[0], table, rows, PositionKind.RANGE, 0, None, reason)
    if len(pads) != 1 or offset != pads[0] + 1:
        return None
    reason = f"indices computed as cumsum(input_ids != {pads[0]}) + {pads[0]}"
    return PositionLookup(
        gather.output[0], table, rows, PositionKind.PADDING_OFFSET, offset, pads[0], reason
    )


def _input_offset(view: GraphView, table: str, given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, "position_offset given"
    values = view.constant(table)
    assert values is not None  # a constant table
    zero_rows = [r for r in range(min(_MAX_PADDING_ROW, values.shape[0])) if not values[r].any()]
    if zero_rows:
        return zero_rows[0] + 1, f"row {zero_rows[0]} of the table is nn.Embedding's padding row"
    return 0, "position_ids input, no padding row in the table"


def _compared_tokens(view: GraphView, indices: str) -> list[int]:
    """Scalar constants that the indices' subgraph compares ``input_ids`` with (pad tokens)."""
    found: list[int] = []
    for node in view.ancestors(indices):
        if node.op_type not in ("Equal", "NotEqual") or len(node.input) != 2:
            continue
        for operand in (0, 1):
            const = view.constant(node.input[operand])
            other = node.input[1 - operand]
            if const is not None and const.size == 1 and "input_ids" in view.value_deps(other):
                found.append(int(const.reshape(())))
    return sorted(set(found))


def _input_dims(view: GraphView) -> tuple[int, int | None]:
    """``input_ids``' static batch size (else 1) and static length (else None)."""
    value = next(i for i in view.graph.input if i.name == "input_ids")
    found = [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]
    batch = found[0] if len(found) == 2 and found[0] else 1
    return batch, found[1] if len(found) == 2 else None


def _probe_feeds(
    view: GraphView, batch: int, length: int, vocab_size: int, avoid: list[int]
) -> dict[str, npt.NDArray[np.generic]]:
    """Rows of ``length`` ordinary tokens (no pad token) for every token input."""
    tokens = [t for t in range(vocab_size) if t not in avoid]
    ids = np.array([tokens[(7 * i + 3) % len(tokens)] for i in range(length)])
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for value in view.graph.input:
        if not view.is_graph_input(value.name):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        data = ids if value.name == "input_ids" else np.ones(length, dtype=np.int64)
        if value.name in ("token_type_ids", "position_ids"):
            data = np.zeros(length, dtype=np.int64)
        feeds[value.name] = np.broadcast_to(data.astype(dtype), (batch, length)).copy()
    return feeds
