"""The pooling of a per-sequence head: found by data flow, then identified by computing it.

A sequence classifier, a reranker or a pooled sentence embedder ends in outputs with one row per
sample (``[batch, ...]``, no sequence axis). Somewhere the data flow leaves the tokens: a
``Gather`` of token 0 (BERT's pooler, RoBERTa's classification head, DistilBERT's
``pre_classifier``), or a masked mean (sentence-transformers' ``sum(mask * h) / sum(mask)``). The
finder locates that place without trusting op patterns:

* the *probe shapes* of the output's ancestors are computed on a probe batch
  (:func:`packrunner.graphs.evaluate`): a tensor is per token when its first two axes are the
  probe's ``[batch, length]``, per row when its first axis is the batch and its second is not;
* walking back from the output through per-row tensors stops at per-token ones: the *cut*. The
  token tensor the pooling reads (``hidden``) is the one cut tensor not computed from
  ``attention_mask`` alone; a per-token op that combines it with a mask-only tensor (the
  ``h * mask`` of a masked mean) belongs to the pooling, and ``hidden`` is then its other operand;
* the *pooled* tensor is the earliest per-row tensor from which the output is computed with
  nothing else but constants: everything after it (dense, tanh, dropout, classifier) is the
  head, which a packed model runs once per segment;
* finally the pooled value is computed on the probe and compared with ``hidden``'s first token
  and with its mean over the sample's tokens (a sample alone, mask of ones: exactly what the
  self-check compares against). Anything else (max pooling, last token, a weighted mean) is
  refused with what was found.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx

from packrunner.convert._match_positions import _probe_feeds
from packrunner.errors import ConversionError
from packrunner.graphs import GraphView, evaluate

__all__ = ["Pooling", "PoolingKind", "find_pooling"]

logger = logging.getLogger("packrunner.convert")

_PROBE_BATCH, _PROBE_LENGTH = 2, 5
# How far back from an output the cut is searched for (a head is a handful of ops).
_HEAD_DEPTH = 40
_RTOL, _ATOL = 1e-5, 1e-6


class PoolingKind(enum.Enum):
    """How the head reduces a sample's tokens to one vector.

    Attributes:
        FIRST_TOKEN: the sample's first token (CLS / ``<s>``).
        MEAN: the mean over the sample's tokens.
    """

    FIRST_TOKEN = "first_token"
    MEAN = "mean"


@dataclass(frozen=True, slots=True)
class Pooling:
    """One pooling and the per-row outputs computed from it.

    Attributes:
        kind: What the pooling computes.
        hidden: The per-token ``[batch, seq, width]`` tensor it reduces.
        pooled: The per-row tensor the head reads (may itself be an output): ``[batch, width]``,
            or ``[batch, 1, width]`` when the first token is sliced rather than gathered.
        pooled_trailing: ``pooled``'s dims after the batch axis.
        outputs: The graph outputs computed from ``pooled`` (and constants) alone.
        trailing: Each output's dims after the batch axis, from the probe.
        width: ``hidden``'s last dim.
        elem_type: ONNX element type of ``hidden``.
        head_ops: Op types of the head, in graph order (for ``--explain``).
    """

    kind: PoolingKind
    hidden: str
    pooled: str
    pooled_trailing: tuple[int, ...]
    outputs: tuple[str, ...]
    trailing: Mapping[str, tuple[int, ...]]
    width: int
    elem_type: int
    head_ops: tuple[str, ...]

    def describe(self) -> str:
        """One line for ``--explain``."""
        head = " -> ".join(self.head_ops) or "nothing"
        return (
            f"pooling: {self.kind.value} of {self.hidden!r} [.., {self.width}] -> "
            f"{self.pooled!r}, then {head} -> {list(self.outputs)}"
        )


def find_pooling(
    model: onnx.ModelProto,
    view: GraphView,
    outputs: Sequence[str],
    *,
    vocab_size: int,
    pad_token: int | None,
) -> list[Pooling]:
    """The pooling behind each per-row output; outputs sharing one pooled tensor share an entry.

    Raises:
        ConversionError: An output's pooling is not found or is not a first token / mean; the
            message names the output and what was found.
    """
    batch, length = _probe_dims(view)
    feeds = _probe_feeds(view, batch, length, vocab_size, [] if pad_token is None else [pad_token])
    region = _ancestors(view, outputs, _HEAD_DEPTH)
    values = dict(zip(region, evaluate(model, view, region, feeds), strict=True))
    shapes = {name: tuple(np.shape(v)) for name, v in values.items()}
    found: dict[tuple[str, str], list[str]] = {}
    for output in outputs:
        hidden, pooled = _cut(view, output, shapes, batch, length)
        found.setdefault((hidden, pooled), []).append(output)
    poolings = []
    for (hidden, pooled), names in found.items():
        kind = _identify(values[hidden], values[pooled], pooled)
        head = _head_nodes(view, pooled, names)
        hidden_value = values[hidden]
        poolings.append(
            Pooling(
                kind=kind,
                hidden=hidden,
                pooled=pooled,
                pooled_trailing=shapes[pooled][1:],
                outputs=tuple(names),
                trailing={name: shapes[name][1:] for name in names},
                width=int(np.shape(hidden_value)[-1]),
                elem_type=int(onnx.helper.np_dtype_to_tensor_dtype(hidden_value.dtype)),
                head_ops=tuple(n.op_type for n in head),
            )
        )
        logger.info("%s", poolings[-1].describe())
    return poolings


def _probe_dims(view: GraphView) -> tuple[int, int]:
    value = next(i for i in view.graph.input if i.name == "input_ids")
    dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
    batch = dims[0] if len(dims) == 2 and dims[0] else _PROBE_BATCH
    length = dims[1] if len(dims) == 2 and dims[1] else _PROBE_LENGTH
    return batch, length


def _ancestors(view: GraphView, outputs: Sequence[str], depth: int) -> list[str]:
    """Computed (non-constant) tensors within ``depth`` ops upstream of ``outputs``."""
    found: dict[str, None] = {}
    frontier = [(name, 0) for name in outputs]
    while frontier:
        name, level = frontier.pop(0)
        if name in found or level > depth or not view.value_deps(name):
            continue
        node = view.producer(name)
        if node is None:
            continue  # a graph input
        found[name] = None
        if node.op_type not in ("Shape", "Size"):
            frontier.extend((i, level + 1) for i in node.input if i)
    return list(found)


def _cut(
    view: GraphView,
    output: str,
    shapes: Mapping[str, tuple[int, ...]],
    batch: int,
    length: int,
) -> tuple[str, str]:
    """``(hidden, pooled)`` of one per-row output (see the module docstring)."""
    mask_only = frozenset({"attention_mask"})

    def per_token(name: str) -> bool:
        shape = shapes.get(name)
        return shape is not None and len(shape) >= 2 and shape[:2] == (batch, length)

    def per_row(name: str) -> bool:
        shape = shapes.get(name)
        return shape is not None and len(shape) >= 1 and shape[0] == batch and not per_token(name)

    if not per_row(output):
        raise _refusal(output, f"its probe shape {shapes.get(output)} is not [batch, ...]")
    rows: list[str] = []  # per-row tensors, nearest the output first
    hidden: set[str] = set()
    frontier, seen = [output], set()
    while frontier:
        name = frontier.pop(0)
        if name in seen or not view.value_deps(name):
            continue
        seen.add(name)
        node = view.producer(name)
        if node is None:
            raise _refusal(output, f"it reads graph input {name!r} directly")
        if per_row(name):
            rows.append(name)
            if node.op_type not in ("Shape", "Size"):
                frontier.extend(i for i in node.input if i)
            continue
        if not per_token(name):
            raise _refusal(output, f"{name!r} (probe shape {shapes.get(name)}) is neither")
        if view.value_deps(name) == mask_only:
            continue  # the mask side of a masked pooling
        # h * mask: the pooling's own op; the tensor it pools is the operand that is no mask.
        operands = [i for i in node.input if i and view.value_deps(i)]
        masks = [i for i in operands if view.value_deps(i) == mask_only]
        others = [i for i in operands if view.value_deps(i) != mask_only]
        if masks and len(others) == 1 and per_token(others[0]):
            hidden.add(others[0])
        else:
            hidden.add(name)
    if len(hidden) != 1:
        raise _refusal(output, f"it reads {len(hidden)} token tensors {sorted(hidden)}, not one")
    # The pooled tensor is the one of the per-row tensors that carry everything the output reads
    # from the tokens (a chain: each is computed from the one before) with the longest head.
    carriers = [name for name in rows if _computed_from(view, output, name)]
    if not carriers:
        raise _refusal(
            output, "no single per-row tensor carries everything it reads from the tokens"
        )
    pooled = max(carriers, key=lambda name: len(_head_nodes(view, name, [output])))
    return hidden.pop(), pooled


def _computed_from(view: GraphView, output: str, source: str) -> bool:
    """Whether ``output`` is computed from ``source`` and constants (shape reads aside) alone."""
    frontier, seen = [output], set()
    while frontier:
        name = frontier.pop()
        if name == source or name in seen or not view.value_deps(name):
            continue
        seen.add(name)
        node = view.producer(name)
        if node is None:
            return False
        if node.op_type in ("Shape", "Size"):
            return False  # a batch-size read: the head would not run per segment unchanged
        frontier.extend(i for i in node.input if i)
    return True


def _head_nodes(view: GraphView, pooled: str, outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes between ``pooled`` and ``outputs``, in graph order."""
    between: set[int] = set()
    frontier = list(outputs)
    while frontier:
        name = frontier.pop()
        node = view.producer(name)
        if name == pooled or node is None or id(node) in between or not view.value_deps(name):
            continue
        between.add(id(node))
        frontier.extend(i for i in node.input if i)
    return [n for n in view.graph.node if id(n) in between]


def _identify(
    hidden: npt.NDArray[np.generic], pooled: npt.NDArray[np.generic], name: str
) -> PoolingKind:
    h = np.asarray(hidden, np.float64)
    p = np.asarray(pooled, np.float64)
    candidates = {PoolingKind.FIRST_TOKEN: h[:, 0], PoolingKind.MEAN: h.mean(axis=1)}
    for kind, expected in candidates.items():
        # [batch, 1, width] (a sliced first token) is the same value as [batch, width].
        if p.size == expected.size and np.allclose(
            p.reshape(expected.shape), expected, rtol=_RTOL, atol=_ATOL
        ):
            return kind
    raise ConversionError(
        f"the per-row tensor {name!r} (shape {p.shape}) is neither the first token nor the mean "
        f"of the token tensor (shape {h.shape}) on a probe batch; only first-token (CLS) and mean "
        "pooling are rewritten per segment"
    )


def _refusal(output: str, detail: str) -> ConversionError:
    return ConversionError(f"cannot find the pooling behind per-row output {output!r}: {detail}")
