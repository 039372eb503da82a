"""Build static-shape BERT ONNX graphs for packed inference with ``onnx.helper`` and numpy only.

Three input layouts ("variants") share one set of weights:

``"packed"``
    Several samples per row of a ``[batch_size, seq_len]`` batch. ``attention_mask`` holds a
    per-token segment id (1, 2, ... per sample in the row, 0 on padding) that the graph turns into
    a block-diagonal attention bias; ``position_ids`` restart at 0 for every sample.
``"padded"``
    One sample per row, plain 0/1 ``attention_mask`` and implicit positions ``0..seq_len-1``;
    the classic Hugging Face export, kept as the twin the packed graphs are checked against.
``"unpack_repack"``
    The token tensors are one stream of ``batch_size * seq_len`` tokens in which samples sit back
    to back and may cross row boundaries; ``unpack_info`` lists their lengths. Token-wise layers
    run on the stream, attention runs on a per-sample ``[max_valid_num, seq_len]`` unpacked view.

All graphs are fp32, use only standard ``ai.onnx`` ops (opset >= 17 for LayerNormalization) and
are checked with ``onnx.checker.check_model(full_check=True)`` before being returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal, TypeAlias, get_args

import numpy as np
import numpy.typing as npt
import onnx
import onnx.checker
import onnx.defs
import onnx.helper
import onnx.numpy_helper
from onnx import TensorProto

from packrunner.models.bert import (
    QA_BIAS,
    QA_WEIGHT,
    BertConfig,
    BertWeights,
    ModelFormatError,
    normalize_weights,
)

__all__ = [
    "ATTENTION_MASK_BIAS",
    "HEADS",
    "MIN_OPSET",
    "VARIANTS",
    "Head",
    "Variant",
    "build_bert_onnx",
    "input_names",
    "output_names",
]

Variant: TypeAlias = Literal["packed", "padded", "unpack_repack"]
Head: TypeAlias = Literal["qa", "encoder"]
VARIANTS: Final[tuple[Variant, ...]] = get_args(Variant)
HEADS: Final[tuple[Head, ...]] = get_args(Head)

MIN_OPSET: Final = 17
"""Oldest opset supported: LayerNormalization became a standard op in opset 17."""

ATTENTION_MASK_BIAS: Final = -10000.0
"""Additive bias on forbidden attention scores. Finite (unlike -inf) so a query with no allowed key
(a padding token, an empty slot) gets a uniform softmax instead of NaN; large enough that
``exp(-10000)`` underflows to exactly 0 in fp32, so masked keys contribute nothing."""

_INPUTS: Final[dict[Variant, tuple[str, ...]]] = {
    "packed": ("input_ids", "token_type_ids", "position_ids", "attention_mask"),
    "padded": ("input_ids", "token_type_ids", "attention_mask"),
    "unpack_repack": ("input_ids", "token_type_ids", "position_ids", "unpack_info"),
}
_OUTPUTS: Final[dict[Head, tuple[str, ...]]] = {
    "qa": ("start_logits", "end_logits"),
    "encoder": ("last_hidden_state", "sentence_embedding"),
}

_FLOAT: Final = TensorProto.FLOAT
_INT32: Final = TensorProto.INT32


def input_names(variant: Variant) -> tuple[str, ...]:
    """Names of the graph inputs of ``variant``, in graph order."""
    return _INPUTS[variant]


def output_names(head: Head) -> tuple[str, ...]:
    """Names of the graph outputs of ``head``, in graph order."""
    return _OUTPUTS[head]


class _Graph:
    """Accumulates nodes and initializers, handing out unique tensor names.

    Every op helper returns the name of its (single) output, so graph code reads like the
    equivalent numpy expression.
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}
        # Small constants recur (axes, 0, 1, shapes); share one initializer per distinct value.
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def _unique(self, base: str) -> str:
        if base not in self._used:
            self._used.add(base)
            return base
        n = self._counters.get(base, 0)
        while f"{base}_{n}" in self._used:
            n += 1
        self._counters[base] = n + 1
        name = f"{base}_{n}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (graph inputs/outputs); fails if already taken."""
        if name in self._used:
            raise AssertionError(f"tensor name {name!r} used twice")
        self._used.add(name)
        return name

    def weight(self, name: str, array: npt.NDArray[Any]) -> str:
        """Add a named initializer (keeps the Hugging Face parameter name)."""
        self.initializers.append(onnx.numpy_helper.from_array(array, self.reserve(name)))
        return name

    def const(self, value: Any, dtype: type[np.generic], name: str = "const") -> str:
        """A constant initializer holding ``np.asarray(value, dtype)``, deduplicated by value."""
        # np.array, not np.ascontiguousarray: the latter turns scalars into shape (1,).
        array = np.array(value, dtype=dtype, order="C")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            tensor = onnx.numpy_helper.from_array(array, self._unique(name))
            self.initializers.append(tensor)
            self._constants[key] = tensor.name
        return self._constants[key]

    def axes(self, *axes: int) -> str:
        """An int64 axes tensor, as Unsqueeze/Squeeze/ReduceSum (opset >= 13) take them."""
        return self.const(list(axes), np.int64, "axes")

    def shape(self, *dims: int) -> str:
        """An int64 shape tensor for Reshape."""
        return self.const(list(dims), np.int64, "shape")

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Append one node and return its output name.

        Args:
            op_type: ONNX operator (default domain).
            *inputs: Input tensor names.
            out: Exact output name (graph outputs); otherwise a unique name derived from the op.
            **attrs: Node attributes.
        """
        output = self.reserve(out) if out is not None else self._unique(op_type.lower())
        self.nodes.append(
            onnx.helper.make_node(op_type, list(inputs), [output], name=output, **attrs)
        )
        return output

    def used_initializers(self) -> list[onnx.TensorProto]:
        """Initializers some node reads; a variant may not need every shared constant."""
        read = {name for node in self.nodes for name in node.input}
        return [tensor for tensor in self.initializers if tensor.name in read]


def _layer_norm(g: _Graph, x: str, prefix: str, weights: BertWeights, eps: float) -> str:
    gamma = g.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    beta = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=eps)


def _dense(g: _Graph, x: str, prefix: str, weights: BertWeights) -> str:
    """``x @ W.T + b`` on a 2-D ``[tokens, in]`` tensor.

    Gemm with ``transB=1`` consumes the ``[out, in]`` torch layout as stored, so initializers stay
    byte-identical to the checkpoint, and it carries the bias add in the same kernel.
    """
    w = g.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    b = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("Gemm", x, w, b, transB=1)


def _gelu(g: _Graph, x: str) -> str:
    """Exact gelu ``x * 0.5 * (1 + erf(x / sqrt(2)))``, spelled as Hugging Face's ``"gelu"``.

    This op order is the pattern onnxruntime's GeluFusion recognises, so it runs as one kernel
    on CPU, while staying plain opset-17 ops for other runtimes.
    """
    scaled = g.op("Div", x, g.const(math.sqrt(2.0), np.float32, "sqrt2"))
    erf = g.op("Erf", scaled)
    one_plus = g.op("Add", erf, g.const(1.0, np.float32, "one"))
    return g.op("Mul", g.op("Mul", x, one_plus), g.const(0.5, np.float32, "half"))


def _attention_core(
    g: _Graph,
    q: str,
    k: str,
    v: str,
    bias: str,
    *,
    rows: int,
    config: BertConfig,
    seq_len: int,
) -> str:
    """Multi-head scaled dot-product attention over ``rows`` independent sequences.

    Args:
        g: Graph under construction.
        q: Queries, ``[rows * seq_len, H]`` or ``[rows, seq_len, H]``.
        k: Keys, same shape as ``q``.
        v: Values, same shape as ``q``.
        bias: Additive score bias broadcastable to ``[rows, heads, seq_len, seq_len]``.
        rows: Number of sequences.
        config: Model hyper-parameters.
        seq_len: Tokens per sequence.

    Returns:
        The context vectors, ``[rows * seq_len, H]``.
    """
    nh, d, h = config.num_heads, config.head_dim, config.hidden_size
    split = g.shape(rows, seq_len, nh, d)
    q4 = g.op("Transpose", g.op("Reshape", q, split), perm=[0, 2, 1, 3])  # [R, nh, S, d]
    # Transposing K straight to [R, nh, d, S] saves a separate transpose of the scores' operand.
    kt = g.op("Transpose", g.op("Reshape", k, split), perm=[0, 2, 3, 1])  # [R, nh, d, S]
    v4 = g.op("Transpose", g.op("Reshape", v, split), perm=[0, 2, 1, 3])  # [R, nh, S, d]
    scores = g.op("MatMul", q4, kt)
    # Divide after the matmul, as Hugging Face does, so rounding matches the reference order.
    scores = g.op("Div", scores, g.const(math.sqrt(d), np.float32, "sqrt_head_dim"))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    context = g.op("MatMul", probs, v4)  # [R, nh, S, d]
    context = g.op("Transpose", context, perm=[0, 2, 1, 3])  # [R, S, nh, d]
    return g.op("Reshape", context, g.shape(rows * seq_len, h))


class _StreamIndex:
    """Index tensors mapping the token stream to per-sample slots and back (unpack_repack).

    Computed once from ``unpack_info`` and shared by every layer.

    Attributes:
        gather: ``[M, S]`` int32 stream index of slot ``k``'s token ``p`` (0 where invalid).
        valid: ``[M, S]`` bool, ``p < len_k`` (and inside the stream).
        inverse: ``[N]`` int32 flat ``k * S + p`` slot index of stream token ``t`` (0 for stream
            padding), so ``Gather(unpacked.reshape(M*S, ...), inverse)`` repacks.
        lengths: ``[M]`` int32 ``unpack_info`` itself.
    """

    def __init__(self, g: _Graph, lengths: str, *, max_valid_num: int, seq_len: int, tokens: int):
        m, s, n = max_valid_num, seq_len, tokens
        self.lengths = lengths
        # Sample k starts at the exclusive prefix sum of the lengths before it.
        ends = g.op("CumSum", lengths, g.const(0, np.int32, "axis0"))  # [M] inclusive
        starts = g.op("Sub", ends, lengths)  # [M] exclusive
        positions = g.const(np.arange(s).reshape(1, s), np.int32, "slot_positions")  # [1, S]
        in_sample = g.op("Less", positions, g.op("Unsqueeze", lengths, g.axes(1)))  # [M, S]
        stream_pos = g.op("Add", g.op("Unsqueeze", starts, g.axes(1)), positions)  # [M, S]
        # Lengths summing past the stream are invalid input; masking them keeps Gather in bounds
        # instead of failing the whole batch inside the runtime.
        in_stream = g.op("Less", stream_pos, g.const(n, np.int32, "num_tokens"))
        self.valid = g.op("And", in_sample, in_stream)
        zero = g.const(0, np.int32, "zero_i32")
        self.gather = g.op("Where", self.valid, stream_pos, zero)

        # Inverse map. The sample holding stream token t is the number of samples that ended at
        # or before t; counting (rather than searching) handles zero-length slots anywhere.
        t_col = g.const(np.arange(n).reshape(n, 1), np.int32, "stream_positions")  # [N, 1]
        ended = g.op("GreaterOrEqual", t_col, g.op("Unsqueeze", ends, g.axes(0)))  # [N, M]
        sample = g.op("ReduceSum", g.op("Cast", ended, to=_INT32), g.axes(1), keepdims=0)  # [N]
        sample_clamped = g.op("Min", sample, g.const(m - 1, np.int32, "last_slot"))
        offset = g.op(
            "Sub",
            g.const(np.arange(n), np.int32, "stream_positions_flat"),
            g.op("Gather", starts, sample_clamped),
        )
        flat = g.op("Add", g.op("Mul", sample_clamped, g.const(s, np.int32, "seq_len")), offset)
        # sample == M means t is past the last token (stream padding); offset >= S only for an
        # invalid length > seq_len. Either way point at slot 0: finite, and never read back.
        real = g.op(
            "And",
            g.op("Less", sample, g.const(m, np.int32, "num_slots")),
            g.op("Less", offset, g.const(s, np.int32, "seq_len")),
        )
        self.inverse = g.op("Where", real, flat, zero)


def _validate(
    config: BertConfig,
    weights: BertWeights,
    variant: str,
    head: str,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    opset: int,
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    for label, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_valid_num", max_valid_num),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len {seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
        )
    if batch_size * seq_len >= 2**31:
        raise ValueError("batch_size * seq_len must fit int32 stream indices")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset {opset} unsupported; need {MIN_OPSET}..{onnx.defs.onnx_opset_version()}"
        )
    if head == "qa" and QA_WEIGHT not in weights:
        raise ModelFormatError(f"head 'qa' needs {QA_WEIGHT}/{QA_BIAS}; the weights have none")


def build_bert_onnx(
    config: BertConfig,
    weights: Mapping[str, npt.NDArray[Any]],
    *,
    variant: Variant,
    batch_size: int = 16,
    seq_len: int = 256,
    max_valid_num: int = 40,
    head: Head = "qa",
    opset: int = MIN_OPSET,
) -> onnx.ModelProto:
    """Build a static-shape fp32 BERT ONNX model for one packing variant.

    Inputs (all ``int32``): ``input_ids``, ``token_type_ids`` ``[batch_size, seq_len]`` always;
    ``position_ids`` ``[batch_size, seq_len]`` for ``"packed"`` and ``"unpack_repack"``;
    ``attention_mask`` ``[batch_size, seq_len]`` (segment ids for ``"packed"``, 0/1 for
    ``"padded"``); ``unpack_info`` ``[max_valid_num]`` sample lengths for ``"unpack_repack"``.

    Outputs (``float32``):

    ============== ==================================== =====================================
    head           packed / padded                      unpack_repack
    ============== ==================================== =====================================
    ``qa``         ``start_logits``, ``end_logits``     same, ``[max_valid_num, seq_len]``,
                   ``[batch_size, seq_len]``            slot ``k`` = sample ``k`` from token 0
    ``encoder``    ``last_hidden_state`` ``[B, S, H]``  ``[max_valid_num, seq_len, H]``
                   ``sentence_embedding``: packed       ``[max_valid_num, H]``
                   ``[B, max_valid_num, H]`` (entry
                   ``[row, k-1]`` = mean of segment
                   ``k``), padded ``[B, H]``
    ============== ==================================== =====================================

    Per-sample outputs are zero past a sample's length (unpack_repack) and for absent segments
    (packed ``sentence_embedding``); values at padding positions of ``[B, S, ...]`` outputs are
    finite but meaningless. No input layout yields NaN.

    Args:
        config: Model hyper-parameters.
        weights: Parameters by Hugging Face name (``bert.`` prefix optional).
        variant: ``"packed"``, ``"padded"`` or ``"unpack_repack"`` (see module docstring).
        batch_size: Rows of the static batch.
        seq_len: Tokens per row; at most ``config.max_position_embeddings``.
        max_valid_num: Most samples per batch (unpack_repack) or segments per row (packed
            ``sentence_embedding``; segment ids above it are left out of that output).
        head: ``"qa"`` (span logits, needs ``qa_outputs.*`` weights) or ``"encoder"``.
        opset: Default-domain opset, at least 17.

    Returns:
        The checked model.

    Raises:
        ValueError: On an unknown variant/head, non-positive sizes or unsupported opset.
        ModelFormatError: If the weights do not match ``config`` or lack a needed QA head.
    """
    # No defensive copy: every array is serialized into its own TensorProto right away.
    w = normalize_weights(config, weights, copy=False)
    _validate(config, w, variant, head, batch_size, seq_len, max_valid_num, opset)
    b, s, m, h = batch_size, seq_len, max_valid_num, config.hidden_size
    n = b * s
    eps = config.layer_norm_eps
    g = _Graph()

    inputs = [
        onnx.helper.make_tensor_value_info(g.reserve(name), _INT32, [b, s])
        for name in _INPUTS[variant]
        if name != "unpack_info"
    ]
    if variant == "unpack_repack":
        inputs.append(onnx.helper.make_tensor_value_info(g.reserve("unpack_info"), _INT32, [m]))

    # --- Embeddings: (word + token_type) + position, in Hugging Face's summation order. ---
    word = g.op(
        "Gather",
        g.weight("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]),
        "input_ids",
    )
    token_type = g.op(
        "Gather",
        g.weight(
            "embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]
        ),
        "token_type_ids",
    )
    position_table = g.weight(
        "embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]
    )
    if variant == "padded":
        # [S, H], broadcast over rows: every row starts at position 0.
        position = g.op("Gather", position_table, g.const(np.arange(s), np.int32, "positions"))
    else:
        position = g.op("Gather", position_table, "position_ids")  # [B, S, H]
    x = g.op("Add", g.op("Add", word, token_type), position)
    # The encoder works on a 2-D [tokens, H] stream: Gemm needs 2-D input, LayerNorm and FFN are
    # token-wise anyway, and unpack_repack's stream is naturally flat.
    x = g.op("Reshape", x, g.shape(n, h))
    x = _layer_norm(g, x, "embeddings.LayerNorm", w, eps)

    # --- Attention bias (and, for unpack_repack, the stream <-> slot index maps). ---
    stream: _StreamIndex | None = None
    bias_value = g.const(ATTENTION_MASK_BIAS, np.float32, "mask_bias")
    zero_f = g.const(0.0, np.float32, "zero_f32")
    if variant == "packed":
        seg = "attention_mask"
        # Padding keys get segment -1, which no query (ids >= 0) equals: "same sample and the
        # key is not padding" becomes one Equal over [B, S, S] instead of Equal, Greater, And.
        # The bias is the only [B, S, S] work packing adds, so its cost is the packed model's
        # overhead per batch over the padded one.
        key_seg = g.op(
            "Where",
            g.op("Greater", seg, g.const(0, np.int32, "zero_i32")),
            seg,
            g.const(-1, np.int32, "minus_one_i32"),
        )
        seg_i = g.op("Unsqueeze", seg, g.axes(2))  # [B, S, 1] query segment
        seg_j = g.op("Unsqueeze", key_seg, g.axes(1))  # [B, 1, S] key segment, -1 on padding
        blocked = g.op("Not", g.op("Equal", seg_i, seg_j))  # [B, S, S]
        # Cast + Mul: onnxruntime's 3-input Where with scalar branches is ~3x slower here.
        blocked_f = g.op("Cast", blocked, to=_FLOAT)
        bias = g.op("Unsqueeze", g.op("Mul", blocked_f, bias_value), g.axes(1))
        attn_rows = b
    elif variant == "padded":
        mask_f = g.op("Cast", "attention_mask", to=_FLOAT)
        # Hugging Face's extended mask (1 - m) * -10000, broadcast over heads and queries.
        inverted = g.op("Sub", g.const(1.0, np.float32, "one"), mask_f)
        bias = g.op("Reshape", g.op("Mul", inverted, bias_value), g.shape(b, 1, 1, s))
        attn_rows = b
    else:
        stream = _StreamIndex(g, "unpack_info", max_valid_num=m, seq_len=s, tokens=n)
        bias = g.op("Reshape", g.op("Where", stream.valid, zero_f, bias_value), g.shape(m, 1, 1, s))
        attn_rows = m

    # --- Transformer layers (post-LayerNorm, as BERT). ---
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."
        # Projections run on the packed stream: fewer rows than the unpacked [M, S] view, and
        # token-wise, so packing cannot change them.
        q, k, v = (
            _dense(g, x, f"{p}attention.self.{proj}", w) for proj in ("query", "key", "value")
        )
        if stream is not None:
            q, k, v = (g.op("Gather", t, stream.gather) for t in (q, k, v))  # [M, S, H]
        context = _attention_core(g, q, k, v, bias, rows=attn_rows, config=config, seq_len=s)
        if stream is not None:
            context = g.op("Gather", context, stream.inverse)  # back to the [N, H] stream
        attn_out = _dense(g, context, f"{p}attention.output.dense", w)
        x = _layer_norm(g, g.op("Add", attn_out, x), f"{p}attention.output.LayerNorm", w, eps)
        ffn = _gelu(g, _dense(g, x, f"{p}intermediate.dense", w))
        ffn = _dense(g, ffn, f"{p}output.dense", w)
        x = _layer_norm(g, g.op("Add", ffn, x), f"{p}output.LayerNorm", w, eps)

    # --- Heads. ---
    outputs: list[onnx.ValueInfoProto]
    if head == "qa":
        logits = g.op(
            "Gemm", x, g.weight(QA_WEIGHT, w[QA_WEIGHT]), g.weight(QA_BIAS, w[QA_BIAS]), transB=1
        )  # [N, 2]
        if stream is None:
            logits = g.op("Reshape", logits, g.shape(b, s, 2))
            out_shape = [b, s]
        else:
            logits = g.op("Gather", logits, stream.gather)  # [M, S, 2]
            valid3 = g.op("Unsqueeze", stream.valid, g.axes(2))
            logits = g.op("Where", valid3, logits, zero_f)
            out_shape = [m, s]
        for index, name in enumerate(_OUTPUTS["qa"]):
            g.op("Gather", logits, g.const(index, np.int64, "index"), axis=2, out=name)
        outputs = [
            onnx.helper.make_tensor_value_info(nm, _FLOAT, out_shape) for nm in _OUTPUTS["qa"]
        ]
    else:
        outputs = _encoder_head(g, x, variant, stream, b=b, s=s, m=m, h=h)

    graph = onnx.helper.make_graph(
        g.nodes,
        f"bert_{variant}_{head}",
        inputs,
        outputs,
        initializer=g.used_initializers(),
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph,
        opset_imports=opsets,
        # The lowest IR version that can carry this opset: newest-IR files are rejected by older
        # runtimes for no benefit here.
        ir_version=onnx.helper.find_min_ir_version_for(opsets),
        producer_name="packrunner.models",
        doc_string=(
            f"BERT {config.num_layers}x{h} ({variant}, head={head}, batch_size={b}, seq_len={s}, "
            f"max_valid_num={m})"
        ),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _encoder_head(
    g: _Graph, x: str, variant: str, stream: _StreamIndex | None, *, b: int, s: int, m: int, h: int
) -> list[onnx.ValueInfoProto]:
    """``last_hidden_state`` and mean-pooled ``sentence_embedding`` outputs.

    Pooling is a matmul with a 0/1 membership matrix (then a divide by the token count, floored at
    1 so empty segments/slots give 0 rather than 0/0 = NaN): one batched GEMM instead of a
    per-segment loop.
    """
    one = g.const(1.0, np.float32, "one")
    if variant == "unpack_repack":
        assert stream is not None
        hidden = g.op("Gather", x, stream.gather)  # [M, S, H]
        valid3 = g.op("Unsqueeze", stream.valid, g.axes(2))
        last = g.op(
            "Where", valid3, hidden, g.const(0.0, np.float32, "zero_f32"), out="last_hidden_state"
        )
        member = g.op("Cast", g.op("Unsqueeze", stream.valid, g.axes(1)), to=_FLOAT)  # [M, 1, S]
        sums = g.op("Reshape", g.op("MatMul", member, last), g.shape(m, h))
        counts = g.op("Cast", g.op("Unsqueeze", stream.lengths, g.axes(1)), to=_FLOAT)  # [M, 1]
        g.op("Div", sums, g.op("Max", counts, one), out="sentence_embedding")
        return [
            onnx.helper.make_tensor_value_info("last_hidden_state", _FLOAT, [m, s, h]),
            onnx.helper.make_tensor_value_info("sentence_embedding", _FLOAT, [m, h]),
        ]

    hidden = g.op("Reshape", x, g.shape(b, s, h), out="last_hidden_state")
    if variant == "packed":
        segment_ids = g.const(np.arange(1, m + 1).reshape(1, m, 1), np.int32, "segment_ids")
        keys = g.op("Unsqueeze", "attention_mask", g.axes(1))  # [B, 1, S]
        member = g.op("Cast", g.op("Equal", keys, segment_ids), to=_FLOAT)  # [B, M, S]
        counts = g.op("ReduceSum", member, g.axes(2), keepdims=1)  # [B, M, 1]
        sums = g.op("MatMul", member, hidden)  # [B, M, H]
        pooled_shape = [b, m, h]
    else:
        mask_f = g.op("Cast", "attention_mask", to=_FLOAT)
        member = g.op("Reshape", mask_f, g.shape(b, 1, s))  # [B, 1, S]
        counts = g.op("ReduceSum", mask_f, g.axes(1), keepdims=1)  # [B, 1]
        sums = g.op("Reshape", g.op("MatMul", member, hidden), g.shape(b, h))
        pooled_shape = [b, h]
    g.op("Div", sums, g.op("Max", counts, one), out="sentence_embedding")
    return [
        onnx.helper.make_tensor_value_info("last_hidden_state", _FLOAT, [b, s, h]),
        onnx.helper.make_tensor_value_info("sentence_embedding", _FLOAT, pooled_shape),
    ]
