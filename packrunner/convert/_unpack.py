"""Unpack/repack rewrite of a static BERT graph's attention, used by :mod:`packrunner.convert`.

In packrunner's *stream* mode (PopRT "end-to-end") the token inputs are one stream of
``batch_size * seq_len`` tokens in which samples sit back to back and may cross row boundaries;
``unpack_info`` ``[max_valid_num]`` lists their lengths. Everything token-wise (embeddings,
projections, feed-forward, LayerNorm) is indifferent to where a token sits, so it runs on the
stream unchanged. Only attention mixes tokens: for every layer this module cuts the *attention
core* out of the stream, from the Q/K/V projection outputs ``[B, S, H]`` to the context
``[B, S, H]`` that feeds the output projection, and runs it on a per-sample view instead:

* unpack: ``Gather(Reshape(x, [B*S, H]), gather)`` gives ``[M, S, H]``, slot ``k`` holding sample
  ``k`` from position 0 (``gather`` is computed once from ``unpack_info``);
* the mask added before Softmax becomes ``[M, 1, 1, S]``: 0 on the slot's tokens, -10000 past its
  length;
* repack: ``Reshape(Gather(Reshape(ctx, [M*S, H]), inverse), [B, S, H])`` puts every token's
  context back at its stream position.

Reshape/Expand targets inside the core are rewritten to their static shapes with the batch
dimension ``B`` replaced by ``M`` (their original targets were computed from the shape of the
``[B, S, H]`` hidden states). The per-token outputs are finally unpacked the same way to
``[M, S, ...]`` and zeroed past each sample's length.

The attention core is found by data flow: the attention Softmax, the ``MatMul`` producing its
scores and the ``MatMul`` consuming its probabilities; Q, K and V are the nearest rank-3
``[B, S, *]`` tensors upstream of those MatMuls, the context the nearest one downstream; the core is
every node downstream of Q/K/V and upstream of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from packrunner.graphs._graph import MASK_BIAS, GraphView, NodeEmitter

__all__ = ["UNPACK_INFO", "AttentionSite", "UnpackError", "unpack_attention"]

UNPACK_INFO = "unpack_info"

# Ops between a Q/K/V projection output and the attention MatMuls (head split, scaling).
_TO_MATMUL_OPS = frozenset({"Reshape", "Transpose", "Mul", "Div", "Cast", "Squeeze", "Unsqueeze"})
# Ops between the probabilities/context MatMul and the merged-heads context.
_FROM_MATMUL_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"})
# Ops between Softmax and the probabilities @ V MatMul (SDPA's NaN guard, casts).
_PROBS_OPS = frozenset({"Cast", "Where", "Identity", "Dropout"})
_WALK_LIMIT = 8


class UnpackError(ValueError):
    """The attention of the graph does not have the shape the rewrite needs."""


@dataclass(frozen=True, slots=True)
class AttentionSite:
    """One attention layer: its Softmax and the Add that adds the old mask before it."""

    softmax: onnx.NodeProto
    mask_add: onnx.NodeProto
    mask_operand: int
    bias_type: int  # element type of the mask bias


def _key(node: onnx.NodeProto) -> str:
    # Node names may be empty; a node's first output name is unique in the graph.
    return str(node.output[0])


class _Unpacker:
    def __init__(
        self,
        view: GraphView,
        taken: set[str],
        shapes: dict[str, list[int]],
        *,
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
        opset: int,
    ) -> None:
        self.view = view
        self.shapes = shapes
        self.b, self.s, self.m = batch_size, seq_len, max_valid_num
        self.emit = NodeEmitter(view, taken, prefix="packrunner/unpack", opset=opset)
        self.gather_index, self.valid, self.inverse = self._stream_index()
        self.biases: dict[int, str] = {}

    # -- the stream <-> slot maps, computed once from unpack_info --------------------------------

    def _stream_index(self) -> tuple[str, str, str]:
        e, m, s, n = self.emit, self.m, self.s, self.b * self.s
        lengths = UNPACK_INFO  # [M] int32
        ends = e.op("CumSum", [lengths, e.const("axis0", 0, np.int32)], "ends")  # inclusive
        starts = e.op("Sub", [ends, lengths], "starts")  # exclusive prefix sums
        slot_pos = e.const("slot_positions", np.arange(s).reshape(1, s), np.int32)  # [1, S]
        in_sample = e.op(
            "Less", [slot_pos, e.with_axes("Unsqueeze", lengths, [1], "lengths_col")], "in_sample"
        )
        stream_pos = e.op(
            "Add", [e.with_axes("Unsqueeze", starts, [1], "starts_col"), slot_pos], "stream_pos"
        )
        # Lengths that sum past the stream are invalid input: masking them keeps every Gather
        # in bounds (finite garbage for that slot) instead of failing the whole batch.
        in_stream = e.op("Less", [stream_pos, e.const("num_tokens", n, np.int32)], "in_stream")
        valid = e.op("And", [in_sample, in_stream], "valid")  # [M, S]
        zero = e.const("zero", 0, np.int32)
        gather = e.op("Where", [valid, stream_pos, zero], "gather")  # [M, S] stream index

        # Inverse: the slot of stream token t is the number of samples ending at or before t.
        # Counting (not searching) copes with empty slots anywhere.
        stream_col = e.const("stream_positions_col", np.arange(n).reshape(n, 1), np.int32)
        ended = e.op(
            "GreaterOrEqual",
            [stream_col, e.with_axes("Unsqueeze", ends, [0], "ends_row")],
            "ended",
        )  # [N, M]
        ended_i = e.op("Cast", [ended], "ended_i", to=TensorProto.INT32)
        sample = e.with_axes("ReduceSum", ended_i, [1], "sample", keepdims=0)  # [N]
        slot = e.op("Min", [sample, e.const("last_slot", m - 1, np.int32)], "slot")
        offset = e.op(
            "Sub",
            [
                e.const("stream_positions", np.arange(n), np.int32),
                e.op("Gather", [starts, slot], "slot_start"),
            ],
            "offset",
        )
        flat = e.op(
            "Add",
            [e.op("Mul", [slot, e.const("seq_len", s, np.int32)], "slot_base"), offset],
            "flat",
        )
        # Stream padding (no sample) and impossible offsets point at slot 0: finite, never read.
        real = e.op(
            "And",
            [
                e.op("Less", [sample, e.const("num_slots", m, np.int32)], "has_sample"),
                e.op("Less", [offset, e.const("seq_len_b", s, np.int32)], "in_row"),
            ],
            "real",
        )
        inverse = e.op("Where", [real, flat, zero], "inverse")  # [N]
        return gather, valid, inverse

    # -- finding one attention core ----------------------------------------------------------

    def _is_token_tensor(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and len(shape) == 3 and shape[:2] == [self.b, self.s]

    def _back_to_token_tensor(self, name: str, what: str) -> str:
        """Walk from a MatMul operand back to the [B, S, H] tensor it was split from."""
        for _ in range(_WALK_LIMIT):
            if self._is_token_tensor(name):
                return name
            node = self.view.producer(name)
            if node is None or node.op_type not in _TO_MATMUL_OPS:
                break
            # Follow the data operand: the input of highest rank (scales are scalars).
            name = max(
                (i for i in node.input if i),
                key=lambda i: len(self.shapes.get(i, [])),
            )
        raise UnpackError(f"cannot trace the attention {what} back to a [B, S, H] tensor")

    def _probs_matmul(self, softmax: onnx.NodeProto) -> onnx.NodeProto:
        frontier = [softmax.output[0]]
        for _ in range(_WALK_LIMIT):
            following: list[str] = []
            for tensor in frontier:
                for node in self.view.consumers(tensor):
                    if node.op_type == "MatMul" and node.input[0] == tensor:
                        return node
                    if node.op_type in _PROBS_OPS:
                        following.extend(node.output)
            frontier = following
        label = softmax.name or softmax.output[0]
        raise UnpackError(f"no probabilities @ V MatMul after Softmax {label!r}")

    def _forward_to_token_tensor(self, name: str) -> str:
        for _ in range(_WALK_LIMIT):
            if self._is_token_tensor(name):
                return name
            nxt = [n for n in self.view.consumers(name) if n.op_type in _FROM_MATMUL_OPS]
            if len(nxt) != 1:
                break
            name = nxt[0].output[0]
        raise UnpackError("cannot follow the attention context forward to a [B, S, H] tensor")

    def _scores_matmul(self, softmax: onnx.NodeProto) -> onnx.NodeProto:
        frontier = [softmax.input[0]]
        for _ in range(_WALK_LIMIT):
            following: list[str] = []
            for tensor in frontier:
                node = self.view.producer(tensor)
                if node is None:
                    continue
                if node.op_type == "MatMul":
                    return node
                following.extend(i for i in node.input if i and self.view.constant(i) is None)
            frontier = following
        raise UnpackError("no Q @ K^T MatMul before the attention Softmax")

    def _core(self, site: AttentionSite) -> tuple[list[str], str, set[str]]:
        """Q/K/V tensors, the context tensor and the keys of the core's nodes."""
        scores = self._scores_matmul(site.softmax)
        probs = self._probs_matmul(site.softmax)
        q = self._back_to_token_tensor(scores.input[0], "query")
        k = self._back_to_token_tensor(scores.input[1], "key")
        v = self._back_to_token_tensor(probs.input[1], "value")
        context = self._forward_to_token_tensor(probs.output[0])
        sources = list(dict.fromkeys([q, k, v]))

        downstream: set[str] = set()
        frontier = list(sources)
        while frontier:
            for node in self.view.consumers(frontier.pop()):
                if _key(node) not in downstream:
                    downstream.add(_key(node))
                    frontier.extend(o for o in node.output if o)
        upstream: set[str] = set()
        frontier = [context]
        while frontier:
            producer = self.view.producer(frontier.pop())
            if producer is not None and _key(producer) not in upstream:
                upstream.add(_key(producer))
                frontier.extend(i for i in producer.input if i)
        core = downstream & upstream
        if _key(site.mask_add) not in core:
            raise UnpackError("the mask Add is not between the Q/K projections and the context")
        return sources, context, core

    # -- rewriting ---------------------------------------------------------------------------

    def _unpack(self, name: str, base: str) -> str:
        """``[B, S, *rest]`` stream tensor -> ``[M, S, *rest]`` per-slot view."""
        rest = self.shapes[name][2:]
        flat = self.emit.op(
            "Reshape",
            [name, self.emit.const(f"{base}_flat_shape", [self.b * self.s, *rest], np.int64)],
            f"{base}_flat",
        )
        return self.emit.op("Gather", [flat, self.gather_index], f"{base}_unpacked")

    def _bias(self, elem_type: int) -> str:
        if elem_type not in self.biases:
            e = self.emit
            keep = e.typed_const("keep", 0.0, elem_type)
            drop = e.typed_const("drop", MASK_BIAS, elem_type)
            bias = e.op("Where", [self.valid, keep, drop], "bias")  # [M, S]
            shape = e.const("bias_shape", [self.m, 1, 1, self.s], np.int64)
            self.biases[elem_type] = e.op("Reshape", [bias, shape], "bias_4d")
        return self.biases[elem_type]

    def rewrite(self, site: AttentionSite, layer: int) -> None:
        self.view.refresh()  # earlier layers rewired edges
        sources, context, core = self._core(site)
        unpacked = {src: self._unpack(src, f"layer{layer}_in{i}") for i, src in enumerate(sources)}
        nodes = [n for n in self.view.graph.node if _key(n) in core]
        for node in nodes:
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                producer = self.view.producer(name)
                if name in unpacked:
                    node.input[slot] = unpacked[name]
                elif producer is not None and _key(producer) in core:
                    continue
                elif _key(node) == _key(site.mask_add) and slot == site.mask_operand:
                    node.input[slot] = self._bias(site.bias_type)
                elif node.op_type in ("Reshape", "Expand") and slot == 1:
                    node.input[slot] = self._slot_shape(node, layer)
                elif self._batch_free(name):
                    continue
                else:
                    raise UnpackError(
                        f"attention node {node.op_type} {node.name or _key(node)!r} reads "
                        f"{name!r} from outside the attention block"
                    )
            leaks = [
                (out, c.name or _key(c))
                for out in node.output
                if out != context
                for c in self.view.consumers(out)
                if _key(c) not in core
            ]
            if leaks:
                raise UnpackError(
                    f"attention tensors {leaks} are used outside the attention block; cannot "
                    "run the block on unpacked samples"
                )
        outside = [c for c in self.view.consumers(context) if _key(c) not in core]
        repacked = self._repack(context, f"layer{layer}_context")
        for consumer in outside:
            for slot, name in enumerate(consumer.input):
                if name == context:
                    consumer.input[slot] = repacked

    def _slot_shape(self, node: onnx.NodeProto, layer: int) -> str:
        shape = self.shapes.get(node.output[0])
        if shape is None or not shape or shape[0] != self.b:
            raise UnpackError(
                f"{node.op_type} {node.name or _key(node)!r} in the attention block has shape "
                f"{shape}, not batch-major [{self.b}, ...]"
            )
        return self.emit.const(f"layer{layer}_shape", [self.m, *shape[1:]], np.int64)

    def _batch_free(self, name: str) -> bool:
        """A constant, or a computed scalar (e.g. a head-size scale); never batch-dependent."""
        if self.view.constant(name) is not None:
            return True
        shape = self.shapes.get(name)
        return shape is not None and int(np.prod(shape)) == 1 and not self.view.value_deps(name)

    def _repack(self, context: str, base: str) -> str:
        rest = self.shapes[context][2:]
        e = self.emit
        flat_shape = e.const(f"{base}_slots_shape", [self.m * self.s, *rest], np.int64)
        flat = e.op("Reshape", [context, flat_shape], f"{base}_slots")
        stream = e.op("Gather", [flat, self.inverse], f"{base}_stream")
        stream_shape = e.const(f"{base}_stream_shape", [self.b, self.s, *rest], np.int64)
        return e.op("Reshape", [stream, stream_shape], f"{base}_repacked")

    def unpack_output(self, name: str, elem_type: int) -> list[int]:
        """Rewire graph output ``name`` ([B, S, ...]) to ``[M, S, ...]``; return the new shape."""
        shape = self.shapes.get(name)
        if shape is None or len(shape) < 2 or shape[:2] != [self.b, self.s]:
            raise UnpackError(f"output {name!r} has shape {shape}, not [{self.b}, {self.s}, ...]")
        internal = self.view.fresh_name(f"{name}_stream", self.emit.taken)
        self.view.rename_tensor(name, internal)
        e = self.emit
        rest = shape[2:]
        flat = e.op(
            "Reshape",
            [internal, e.const(f"{name}_flat_shape", [self.b * self.s, *rest], np.int64)],
            f"{name}_flat",
        )
        slots = e.op("Gather", [flat, self.gather_index], f"{name}_slots")
        valid = self.valid
        if rest:
            valid_shape = e.const(
                f"{name}_valid_shape", [self.m, self.s] + [1] * len(rest), np.int64
            )
            valid = e.op("Reshape", [self.valid, valid_shape], f"{name}_valid")
        zero = e.typed_const(f"{name}_zero", 0.0, elem_type)
        # Positions past a sample's length hold other samples' tokens (or padding): zero them
        # so a slot holds only its own sample.
        e.nodes.append(
            onnx.helper.make_node(
                "Where",
                [valid, slots, zero],
                [name],
                name=self.view.fresh_name(f"{e.prefix}/Where_{name}", e.taken),
            )
        )
        return [self.m, self.s, *rest]


def unpack_attention(
    view: GraphView,
    taken: set[str],
    sites: Sequence[AttentionSite],
    shapes: dict[str, list[int]],
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    opset: int,
) -> tuple[list[onnx.NodeProto], dict[str, list[int]]]:
    """Rewrite every attention core of a static graph to run per sample slot.

    Args:
        view: The static ``[batch_size, seq_len]`` graph; edited in place (node inputs,
            initializers, the outputs' producers renamed).
        taken: Names already reserved by the caller.
        sites: One per attention layer.
        shapes: Static shape of every tensor (strict shape inference of the static graph).
        batch_size: Rows of the stream.
        seq_len: Tokens per row, and per sample slot.
        max_valid_num: Sample slots (``unpack_info`` length).
        opset: Default-domain opset of the model.

    Returns:
        The new nodes (to be added to the graph, in order) and the new shape of each output.

    Raises:
        UnpackError: An attention core does not have the expected form.
    """
    unpacker = _Unpacker(
        view,
        taken,
        shapes,
        batch_size=batch_size,
        seq_len=seq_len,
        max_valid_num=max_valid_num,
        opset=opset,
    )
    for layer, site in enumerate(sites):
        unpacker.rewrite(site, layer)
    output_shapes = {
        o.name: unpacker.unpack_output(o.name, o.type.tensor_type.elem_type)
        for o in list(view.graph.output)
    }
    return unpacker.emit.nodes, output_shapes
