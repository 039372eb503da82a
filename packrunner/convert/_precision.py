"""The precision of a converted graph: fp32 as exported, or fp16 (PopRT's ``--precision fp16``).

An fp16 conversion rewrites the *converted* graph (after the packed / unpack-repack rewrites,
which are precision-blind) with onnxruntime's own float16 converter
(``onnxruntime.transformers.float16``, the maintained fork of onnxconverter-common's, shipped
with onnxruntime: no extra dependency). Weights and every float activation become fp16.

* **Inputs** stay int32 (token ids, segment ids, positions, ``unpack_info``): they were never
  float.
* **Outputs** are cast back to fp32. The runner's output checks, pooling, the serving codecs and
  every caller already handle fp32; an fp16 model is then a drop-in replacement for its fp32 twin
  (same specs, same layouts), and the one Cast per output costs nothing next to the encoder.
  The values still carry fp16's error (they are fp16 numbers widened exactly).
* **The attention bias** stays finite: :data:`~packrunner.graphs.MASK_BIAS` (-10000) is exactly
  representable in fp16 (10000 = 625 * 2**4 needs 10 significant bits, fp16 has 11) and far from
  its limit (65504); ``exp(-10000)`` underflows to 0, so masked keys contribute nothing, and a
  fully masked row (a padding token, an empty slot) still gets a finite softmax (every score is
  ``-10000 + s``, the max is subtracted first). Exporters' own masks use ``finfo(float32).min``,
  which the converter clamps to -65504; a packed model no longer reads them.
* **Index arithmetic stays fp32**: float computations whose result is cast to an integer (MPNet's
  relative-position buckets: ``log(distance) / log(128) * 16`` truncated to a bucket index) would
  round to neighbouring buckets in fp16 and give wrong numbers (0.2 on a 2-layer MPNet, 5.8x the
  fp16 tolerance); they are found by data flow and kept in fp32.

The self-check (:mod:`packrunner.convert._selfcheck`) holds an fp16 conversion to
:data:`FP16_TOLERANCE` instead of :data:`FP32_TOLERANCE`; the derivation is at the constant.
"""

from __future__ import annotations

import enum

import onnx
from onnx import TensorProto

from packrunner.errors import ConversionError
from packrunner.graphs import GraphView

__all__ = ["FP16_TOLERANCE", "FP32_TOLERANCE", "Precision", "index_arithmetic", "to_float16"]

#: Relative tolerance of an fp32 conversion's self-check (of the largest reference magnitude,
#: at least 1): the rewrites reorder nothing but the attention of each sample, so packed and
#: per-sample outputs agree to fp32 rounding (measured: <= 9e-6 on outputs of magnitude ~3).
FP32_TOLERANCE = 1e-4

#: fp16's unit roundoff: it keeps 11 significant bits, so rounding a value to fp16 changes it by
#: at most ``2**-11`` of its magnitude.
FP16_UNIT_ROUNDOFF = 2.0**-11

#: Relative tolerance of an fp16 conversion's self-check: ``2**4`` unit roundoffs (7.8e-3) of the
#: largest reference magnitude of an output (at least 1).
#:
#: Derivation. Every weight and every activation is rounded to fp16 when it is stored (relative
#: error at most ``u = 2**-11``). onnxruntime's CPU kernels compute in fp32 (it inserts casts
#: around the ops it has no fp16 kernel for), so what accumulates is the rounding of stored
#: tensors, not of long sums. One encoder layer stores about 16 tensors in sequence (Q, K, V,
#: scores, probabilities, context, projection, residual, LayerNorm, two feed-forward matmuls,
#: GELU, the second residual and LayerNorm, the next layer's input): if all 16 roundings of a
#: layer added up with one sign, the output would be off by ``16 u`` of its magnitude. Deeper
#: models do not add more: each LayerNorm renormalises the error it inherits together with the
#: signal, and roundings of both signs partly cancel. Measured (fp16 packed vs the fp32 export
#: on each sample alone, lengths 1..seq_len):
#:
#: * tiny 2-layer fixtures (hidden 32, outputs up to ~5): up to 6.1e-3, at most 1.4e-3 of the
#:   magnitude (2.8 ``u``);
#: * all-MiniLM-L6-v2, real weights (6 layers, hidden 384, outputs up to 6.3): 4.0e-3, i.e.
#:   6.4e-4 of the magnitude (1.3 ``u``).
#:
#: So the bound ``16 u`` is 5.7x above the worst measured, and it still bites: the mistakes the
#: self-check exists for (positions counted from the row start, samples attending to their row
#: neighbours) move outputs by 1.5 to 4.3 on magnitudes of 3 to 5, 60 to 120 times the bound, and
#: MPNet's position buckets computed in fp16 (see :func:`index_arithmetic`) by 0.195, 5.8 times
#: it (tests/convert/test_convert_precision.py holds these negative controls).
FP16_TOLERANCE = 2**4 * FP16_UNIT_ROUNDOFF


class Precision(enum.StrEnum):
    """The float precision of a converted graph (``precision=`` of the converter).

    Attributes:
        FP32: As exported (the exporters' fp32).
        FP16: Weights and activations in fp16; int32 inputs, fp32 outputs (see the module).
    """

    FP32 = "fp32"
    FP16 = "fp16"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        """``value`` (a member or its string value); ``ValueError`` naming the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"precision must be one of {choices}, got {value!r}") from None

    @property
    def tolerance(self) -> float:
        """The self-check's relative tolerance for a conversion to this precision."""
        return FP16_TOLERANCE if self is Precision.FP16 else FP32_TOLERANCE


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with fp16 weights and activations, int inputs as they are and fp32 outputs.

    Raises:
        ConversionError: The graph does not convert (the message is the converter's).
    """
    # Imported here: onnxruntime.transformers pulls its optional helpers only when used.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    view = GraphView(model.graph)
    for node in model.graph.node:  # the converter blocks nodes by name
        if not node.name:
            node.name = view.fresh_name(f"{node.op_type}_unnamed")
    try:
        converted: onnx.ModelProto = convert_float_to_float16(
            model,
            keep_io_types=True,  # no float inputs; the outputs stay fp32 (see the module)
            node_block_list=sorted(index_arithmetic(model)),
        )
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ConversionError(f"cannot convert the graph to fp16: {exc}") from exc
    GraphView(converted.graph).toposort()  # the casts around kept-fp32 nodes come last
    return converted


_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})
_INTEGERS = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8}
)


def index_arithmetic(model: onnx.ModelProto) -> set[str]:
    """Names of the float nodes whose values end up cast to an integer (indices, buckets).

    Walks up from every float -> integer ``Cast`` through the nodes that produce float tensors.
    ``model`` must carry value_info for its tensors (the converter's validated graphs do).
    """
    graph = model.graph
    elem_types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    elem_types.update((t.name, t.data_type) for t in graph.initializer)
    view = GraphView(graph)
    found: set[str] = set()
    frontier = [
        node.input[0]
        for node in graph.node
        if node.op_type == "Cast"
        and next((a.i for a in node.attribute if a.name == "to"), 0) in _INTEGERS
        and elem_types.get(node.input[0]) in _FLOATS
    ]
    while frontier:
        producer = view.producer(frontier.pop())
        if producer is None or producer.name in found:
            continue
        if not any(elem_types.get(out) in _FLOATS for out in producer.output):
            continue
        found.add(producer.name)
        frontier.extend(i for i in producer.input if i)
    return found
