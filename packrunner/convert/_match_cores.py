"""Data-flow matcher of the unpack/repack conversion: each layer's attention core.

Like :mod:`packrunner.convert._match`, it reads a static ``[B, S]`` graph and returns plain
dataclasses (tensor names), raising :class:`~packrunner.errors.ConversionError` on a graph whose
attention cannot run per sample slot; :mod:`packrunner.convert._unpack` does the rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from packrunner.convert._match import MaskSite
from packrunner.errors import ConversionError
from packrunner.graphs import GraphView

__all__ = ["AttentionCore", "find_attention_cores"]

# Ops between a Q/K/V projection and the attention MatMuls (head split, scaling), between the
# probabilities @ V MatMul and the merged-heads context, and between Softmax and that MatMul
# (SDPA's NaN guard, casts).
_TO_MATMUL_OPS = frozenset({"Reshape", "Transpose", "Mul", "Div", "Cast", "Squeeze", "Unsqueeze"})
_FROM_MATMUL_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"})
_PROBS_OPS = frozenset({"Cast", "Where", "Identity", "Dropout"})
_WALK_LIMIT = 8


@dataclass(frozen=True, slots=True)
class AttentionCore:
    """One layer's attention, cut out of a static ``[B, S]`` graph to run per sample slot.

    Attributes:
        mask: Where the exported mask is added before this layer's Softmax.
        sources: The Q/K/V ``[B, S, *]`` tensors the core reads (each once).
        context: The ``[B, S, H]`` context tensor the core produces.
        nodes: Output names (one per node) of the core's nodes.
        reshapes: ``(node output, slot shape)`` of every Reshape/Expand in the core: its target
            becomes the static shape with batch ``B`` replaced by the slot count.
    """

    mask: MaskSite
    sources: tuple[str, ...]
    context: str
    nodes: frozenset[str]
    reshapes: tuple[tuple[str, tuple[int, ...]], ...]


def find_attention_cores(
    view: GraphView,
    sites: Sequence[MaskSite],
    shapes: Mapping[str, Sequence[int]],
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
) -> list[AttentionCore]:
    """The attention core of every mask site of a static graph.

    The core is found by data flow: the attention Softmax, the ``MatMul`` producing its scores and
    the ``MatMul`` consuming its probabilities; Q, K and V are the nearest rank-3 ``[B, S, *]``
    tensors upstream of those MatMuls, the context the nearest one downstream; the core is every
    node downstream of Q/K/V and upstream of the context. It must read nothing batch-dependent from
    outside but Q/K/V and the mask, and nothing outside may read it but through the context.

    Args:
        view: The static graph.
        sites: Its mask sites, one per layer.
        shapes: Static shape of every tensor (strict shape inference).
        batch_size: ``B``.
        seq_len: ``S``.
        max_valid_num: Sample slots, which replace ``B`` inside the cores.
    """
    finder = _CoreFinder(view, shapes, batch_size, seq_len, max_valid_num)
    return [finder.core(site) for site in sites]


def _unpack_error(detail: str) -> ConversionError:
    return ConversionError(f"cannot unpack/repack attention: {detail}")


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


class _CoreFinder:
    def __init__(
        self,
        view: GraphView,
        shapes: Mapping[str, Sequence[int]],
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
    ) -> None:
        self.view = view
        self.shapes = shapes
        self.b, self.s, self.m = batch_size, seq_len, max_valid_num

    def _is_token_tensor(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and len(shape) == 3 and list(shape[:2]) == [self.b, self.s]

    def _back_to_token_tensor(self, name: str, what: str) -> str:
        """Walk from a MatMul operand back to the [B, S, H] tensor it was split from."""
        for _ in range(_WALK_LIMIT):
            if self._is_token_tensor(name):
                return name
            node = self.view.producer(name)
            if node is None or node.op_type not in _TO_MATMUL_OPS:
                break
            # Follow the data operand: the input of highest rank (scales are scalars).
            name = max((i for i in node.input if i), key=lambda i: len(self.shapes.get(i, [])))
        raise _unpack_error(f"cannot trace the attention {what} back to a [B, S, H] tensor")

    def _probs_matmul(self, softmax: str) -> onnx.NodeProto:
        frontier = [softmax]
        for _ in range(_WALK_LIMIT):
            following: list[str] = []
            for tensor in frontier:
                for node in self.view.consumers(tensor):
                    if node.op_type == "MatMul" and node.input[0] == tensor:
                        return node
                    if node.op_type in _PROBS_OPS:
                        following.extend(node.output)
            frontier = following
        raise _unpack_error(f"no probabilities @ V MatMul after Softmax output {softmax!r}")

    def _forward_to_token_tensor(self, name: str) -> str:
        for _ in range(_WALK_LIMIT):
            if self._is_token_tensor(name):
                return name
            following = [n for n in self.view.consumers(name) if n.op_type in _FROM_MATMUL_OPS]
            if len(following) != 1:
                break
            name = following[0].output[0]
        raise _unpack_error("cannot follow the attention context forward to a [B, S, H] tensor")

    def _scores_matmul(self, softmax: str) -> onnx.NodeProto:
        node = self.view.producer(softmax)
        frontier = [] if node is None else [node.input[0]]
        for _ in range(_WALK_LIMIT):
            following: list[str] = []
            for tensor in frontier:
                producer = self.view.producer(tensor)
                if producer is None:
                    continue
                if producer.op_type == "MatMul":
                    return producer
                following.extend(i for i in producer.input if i and self.view.constant(i) is None)
            frontier = following
        raise _unpack_error("no Q @ K^T MatMul before the attention Softmax")

    def core(self, site: MaskSite) -> AttentionCore:
        scores = self._scores_matmul(site.softmax)
        probs = self._probs_matmul(site.softmax)
        q = self._back_to_token_tensor(scores.input[0], "query")
        k = self._back_to_token_tensor(scores.input[1], "key")
        v = self._back_to_token_tensor(probs.input[1], "value")
        context = self._forward_to_token_tensor(probs.output[0])
        sources = tuple(dict.fromkeys([q, k, v]))

        downstream: set[str] = set()
        frontier = list(sources)
        while frontier:
            for node in self.view.consumers(frontier.pop()):
                if node.output[0] not in downstream:
                    downstream.add(node.output[0])
                    frontier.extend(o for o in node.output if o)
        upstream: set[str] = set()
        frontier = [context]
        while frontier:
            producer = self.view.producer(frontier.pop())
            if producer is not None and producer.output[0] not in upstream:
                upstream.add(producer.output[0])
                frontier.extend(i for i in producer.input if i)
        core = frozenset(downstream & upstream)
        if site.add not in core:
            raise _unpack_error("the mask Add is not between the Q/K projections and the context")
        return AttentionCore(
            mask=site,
            sources=sources,
            context=context,
            nodes=core,
            reshapes=self._check_reads(site, sources, context, core),
        )

    def _check_reads(
        self, site: MaskSite, sources: tuple[str, ...], context: str, core: frozenset[str]
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Fail on a core that reads or leaks batch-dependent tensors; return its reshapes."""
        reshapes: list[tuple[str, tuple[int, ...]]] = []
        for node in self.view.graph.node:
            key = node.output[0]
            if key not in core:
                continue
            for slot, name in enumerate(node.input):
                producer = self.view.producer(name) if name else None
                if not name or name in sources:
                    continue
                if producer is not None and producer.output[0] in core:
                    continue
                if key == site.add and slot == site.operand:
                    continue  # the mask, replaced by the slot bias
                if node.op_type in ("Reshape", "Expand") and slot == 1:
                    reshapes.append((key, self._slot_shape(node)))
                elif not self._batch_free(name):
                    raise _unpack_error(
                        f"attention node {_label(node)} reads {name!r} from outside the "
                        "attention block"
                    )
            leaks = [
                (out, consumer.name or consumer.output[0])
                for out in node.output
                if out != context
                for consumer in self.view.consumers(out)
                if consumer.output[0] not in core
            ]
            if leaks:
                raise _unpack_error(
                    f"attention tensors {leaks} are used outside the attention block; cannot "
                    "run the block on unpacked samples"
                )
        return tuple(reshapes)

    def _slot_shape(self, node: onnx.NodeProto) -> tuple[int, ...]:
        shape = self.shapes.get(node.output[0])
        if shape is None or not shape or shape[0] != self.b:
            raise _unpack_error(
                f"{_label(node)} in the attention block has shape "
                f"{None if shape is None else list(shape)}, not batch-major [{self.b}, ...]"
            )
        return (self.m, *shape[1:])

    def _batch_free(self, name: str) -> bool:
        """A constant, or a computed scalar (e.g. a head-size scale); never batch-dependent."""
        if self.view.constant(name) is not None:
            return True
        shape = self.shapes.get(name)
        return shape is not None and int(np.prod(shape)) == 1 and not self.view.value_deps(name)
