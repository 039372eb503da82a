"""Unpack/repack rewrite of a static BERT graph's attention (:attr:`InputForm.UNPACK_REPACK`).

Everything token-wise (embeddings, projections, feed-forward, LayerNorm) is indifferent to where a
token sits, so it runs on the ``[B, S]`` token stream unchanged. Only attention mixes tokens: each
:class:`~packrunner.convert._match_cores.AttentionCore` found in the static graph, from the Q/K/V
projection outputs ``[B, S, H]`` to the context ``[B, S, H]``, runs on a per-sample view instead:

* unpack: ``Gather(Reshape(x, [B*S, H]), gather)`` gives ``[M, S, H]``, slot ``k`` holding sample
  ``k`` from position 0;
* the mask added before Softmax becomes the ``[M, 1, 1, S]`` slot bias;
* Reshape/Expand targets inside the core become their static shapes with ``B`` replaced by ``M``;
* repack: ``Reshape(Gather(Reshape(ctx, [M*S, H]), inverse), [B, S, H])`` puts every token's
  context back at its stream position.

The per-token outputs are finally unpacked the same way to ``[M, S, ...]`` and zeroed past each
sample's length. The index tensors, the bias and the gathers are
:class:`packrunner.graphs.StreamIndex`, the code the model builder uses too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
from onnx import TensorProto, helper

from packrunner.convert._match_cores import AttentionCore
from packrunner.errors import ConversionError
from packrunner.graphs import UNPACK_INFO, GraphView, NodeEmitter, StreamIndex

__all__ = ["unpack_attention"]


def unpack_attention(
    view: GraphView,
    cores: Sequence[AttentionCore],
    shapes: Mapping[str, Sequence[int]],
    *,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    opset: int,
    per_sample: Collection[str] = (),
) -> None:
    """Run every attention core per sample slot and unpack the outputs; adds ``unpack_info``.

    Args:
        view: The static ``[batch_size, seq_len]`` graph; edited in place.
        cores: One per attention layer, found on this graph.
        shapes: Static shape of every tensor of the graph.
        batch_size: Rows of the stream.
        seq_len: Tokens per row, and per sample slot.
        max_valid_num: Sample slots (``unpack_info`` length).
        opset: Default-domain opset of the model.
        per_sample: Outputs left as they are (per-sequence heads, which
            :func:`packrunner.convert._pooling.pool_per_slot` rewrites next).

    Raises:
        ConversionError: An output is not per token (``[batch_size, seq_len, ...]``).
    """
    graph = view.graph
    b, s, m = batch_size, seq_len, max_valid_num
    emit = NodeEmitter(view, prefix="packrunner/unpack", opset=opset)
    stream = StreamIndex(emit, UNPACK_INFO, batch_size=b, seq_len=s, max_valid_num=m)

    def flat(name: str, rows: int, rest: Sequence[int], base: str) -> str:
        """``[B or M, S, *rest]`` -> ``[rows, *rest]``: one token (or slot position) per row."""
        return emit.op(
            "Reshape", [name, emit.const([rows, *rest], np.int64, f"{base}_shape")], base
        )

    for layer, core in enumerate(cores):
        unpacked = {
            source: stream.unpack(
                flat(source, b * s, shapes[source][2:], f"layer{layer}_in{i}_flat")
            )
            for i, source in enumerate(core.sources)
        }
        targets = dict(core.reshapes)
        for node in graph.node:
            key = node.output[0]
            if key not in core.nodes:
                continue
            for slot, name in enumerate(node.input):
                if name in unpacked:
                    node.input[slot] = unpacked[name]
                elif key == core.mask.add and slot == core.mask.operand:
                    node.input[slot] = stream.attention_bias(core.mask.elem_type)
                elif key in targets and slot == 1:
                    node.input[slot] = emit.const(targets[key], np.int64, f"layer{layer}_shape")
        rest = list(shapes[core.context][2:])
        slots = flat(core.context, m * s, rest, f"layer{layer}_context_slots")
        repacked = emit.op(
            "Reshape",
            [stream.repack(slots), emit.const([b, s, *rest], np.int64, "stream_shape")],
            f"layer{layer}_context_repacked",
        )
        for consumer in view.consumers(core.context):
            if consumer.output[0] in core.nodes:
                continue
            for slot, name in enumerate(consumer.input):
                if name == core.context:
                    consumer.input[slot] = repacked

    new_shapes: dict[str, list[int]] = {}
    for output in [o for o in graph.output if o.name not in per_sample]:
        shape = list(shapes.get(output.name, []))
        if len(shape) < 2 or shape[:2] != [b, s]:
            raise ConversionError(
                f"cannot unpack/repack attention: output {output.name!r} has shape "
                f"{shape or None}, not [{b}, {s}, ...]"
            )
        internal = view.fresh_name(f"{output.name}_stream")
        view.rename_tensor(output.name, internal)
        elem_type = output.type.tensor_type.elem_type
        stream.unpack_zeroed(
            flat(internal, b * s, shape[2:], f"{output.name}_flat"),
            shape[2:],
            elem_type,
            f"{output.name}_slots",
            out=output.name,
        )
        new_shapes[output.name] = [m, s, *shape[2:]]
    graph.node.extend(emit.nodes)
    graph.input.append(helper.make_tensor_value_info(UNPACK_INFO, TensorProto.INT32, [m]))
    for index, output in enumerate(graph.output):
        if output.name in per_sample:
            continue
        graph.output[index].CopyFrom(
            helper.make_tensor_value_info(
                output.name, output.type.tensor_type.elem_type, new_shapes[output.name]
            )
        )
    view.refresh()
