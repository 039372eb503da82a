"""Build static-shape BERT ONNX graphs for packed inference with ``onnx.helper`` and numpy only.

One set of weights, one graph per :class:`~packrunner.InputForm`:

``InputForm.PACKED``
    Several samples per row of a ``[batch_size, seq_len]`` batch. ``attention_mask`` holds a
    per-token segment id (1, 2, ... per sample in the row, 0 on padding) that the graph turns into
    a block-diagonal attention bias; ``position_ids`` restart at 0 for every sample.
``InputForm.PADDED``
    One sample per row, plain 0/1 ``attention_mask`` and implicit positions ``0..seq_len-1``;
    the classic Hugging Face export, kept as the twin the packed graphs are checked against.
``InputForm.UNPACK_REPACK``
    The token tensors are one stream of ``batch_size * seq_len`` tokens in which samples sit back
    to back and may cross row boundaries; ``unpack_info`` lists their lengths. Token-wise layers
    run on the stream, attention runs on a per-sample ``[max_valid_num, seq_len]`` unpacked view.

``dynamic=True`` builds the packed and padded forms with symbolic ``batch`` and ``seq`` input
dims instead: every shape is then computed from ``Shape(input_ids)`` (or a ``-1`` reshape), so
one model serves any ``[rows, width]`` batch up to ``seq_len`` wide, computing exactly what the
fixed build of that shape computes (same ops on the same values).

The attention biases and the stream index come from :mod:`packrunner.graphs`, the same code the
converter rewrites exported models with. All graphs are fp32, use only standard ``ai.onnx`` ops
(opset >= 17 for LayerNormalization) and are checked with
``onnx.checker.check_model(full_check=True)`` before being returned.
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
from onnx import TensorProto

from packrunner.config import InputForm
from packrunner.graphs import (
    UNPACK_INFO,
    GraphView,
    NodeEmitter,
    StreamIndex,
    block_diagonal_bias,
    padding_bias,
)
from packrunner.models.bert import (
    QA_BIAS,
    QA_WEIGHT,
    BertConfig,
    BertWeights,
    ModelFormatError,
    normalize_weights,
)

__all__ = [
    "HEADS",
    "MIN_OPSET",
    "Head",
    "build_bert_onnx",
    "input_names",
    "output_names",
]

Head: TypeAlias = Literal["qa", "encoder"]
HEADS: Final[tuple[Head, ...]] = get_args(Head)

MIN_OPSET: Final = 17
"""Oldest opset supported: LayerNormalization became a standard op in opset 17."""

_INPUTS: Final[dict[InputForm, tuple[str, ...]]] = {
    InputForm.PACKED: ("input_ids", "token_type_ids", "position_ids", "attention_mask"),
    InputForm.PADDED: ("input_ids", "token_type_ids", "attention_mask"),
    InputForm.UNPACK_REPACK: ("input_ids", "token_type_ids", "position_ids", UNPACK_INFO),
}
_OUTPUTS: Final[dict[Head, tuple[str, ...]]] = {
    "qa": ("start_logits", "end_logits"),
    "encoder": ("last_hidden_state", "sentence_embedding"),
}

_FLOAT: Final = TensorProto.FLOAT
_INT32: Final = TensorProto.INT32


def input_names(form: InputForm | str) -> tuple[str, ...]:
    """Names of the graph inputs of a model of ``form``, in graph order."""
    return _INPUTS[InputForm.parse(form)]


def output_names(head: Head) -> tuple[str, ...]:
    """Names of the graph outputs of ``head``, in graph order."""
    return _OUTPUTS[head]


def _layer_norm(e: NodeEmitter, x: str, prefix: str, weights: BertWeights, eps: float) -> str:
    gamma = e.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    beta = e.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return e.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)


def _dense(e: NodeEmitter, x: str, prefix: str, weights: BertWeights) -> str:
    """``x @ W.T + b`` on a 2-D ``[tokens, in]`` tensor.

    Gemm with ``transB=1`` consumes the ``[out, in]`` torch layout as stored, so initializers stay
    byte-identical to the checkpoint, and it carries the bias add in the same kernel.
    """
    w = e.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    b = e.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return e.op("Gemm", [x, w, b], transB=1)


def _gelu(e: NodeEmitter, x: str) -> str:
    """Exact gelu ``x * 0.5 * (1 + erf(x / sqrt(2)))``, spelled as Hugging Face's ``"gelu"``.

    This op order is the pattern onnxruntime's GeluFusion recognises, so it runs as one kernel
    on CPU, while staying plain opset-17 ops for other runtimes.
    """
    scaled = e.op("Div", [x, e.const(math.sqrt(2.0), np.float32, "sqrt2")])
    one_plus = e.op("Add", [e.op("Erf", [scaled]), e.const(1.0, np.float32, "one")])
    return e.op("Mul", [e.op("Mul", [x, one_plus]), e.const(0.5, np.float32, "half")])


class _Shapes:
    """Reshape targets of one build: constants at a fixed shape, computed ones when dynamic.

    A dynamic build takes ``[rows, seq]`` from ``Shape(input_ids)`` once and concatenates the
    fixed trailing dims to it; flattened ``[tokens, ...]`` targets use ``-1``.
    """

    def __init__(self, e: NodeEmitter, *, rows: int, seq_len: int, dynamic: bool) -> None:
        self._e, self.rows, self.seq_len = e, rows, seq_len
        self._batch = e.op("Shape", ["input_ids"], "batch_shape") if dynamic else None

    @property
    def dynamic(self) -> bool:
        return self._batch is not None

    def batch(self, *trailing: int) -> str:
        """``[rows, seq_len, *trailing]``."""
        if self._batch is None:
            return self._e.const([self.rows, self.seq_len, *trailing], np.int64, "shape")
        tail = self._e.const(list(trailing), np.int64, "shape_tail")
        return self._e.op("Concat", [self._batch, tail], "shape", axis=0)

    def flat(self, *trailing: int) -> str:
        """``[rows * seq_len, *trailing]``."""
        tokens = -1 if self._batch is not None else self.rows * self.seq_len
        return self._e.const([tokens, *trailing], np.int64, "shape")

    def width(self) -> str:
        """``[seq_len]`` as a 1-D int64 tensor (for Slice ends)."""
        if self._batch is None:
            return self._e.const([self.seq_len], np.int64, "seq_len")
        one, two = (self._e.const([v], np.int64, "index") for v in (1, 2))
        return self._e.op("Slice", [self._batch, one, two], "seq_len")


def _attention_core(
    e: NodeEmitter,
    q: str,
    k: str,
    v: str,
    bias: str,
    *,
    rows: int,
    config: BertConfig,
    seq_len: int,
    shapes: _Shapes | None = None,
) -> str:
    """Multi-head scaled dot-product attention over ``rows`` independent sequences.

    Args:
        e: Graph under construction.
        q: Queries, ``[rows * seq_len, H]`` or ``[rows, seq_len, H]``.
        k: Keys, same shape as ``q``.
        v: Values, same shape as ``q``.
        bias: Additive score bias broadcastable to ``[rows, heads, seq_len, seq_len]``.
        rows: Number of sequences.
        config: Model hyper-parameters.
        seq_len: Tokens per sequence.
        shapes: The batch's dynamic shapes, when the sequences are the ``[rows, seq]`` batch
            rows of a dynamic build (None: ``rows`` and ``seq_len`` are fixed).

    Returns:
        The context vectors, ``[rows * seq_len, H]``.
    """
    nh, d, h = config.num_heads, config.head_dim, config.hidden_size
    dynamic = shapes is not None and shapes.dynamic
    split = shapes.batch(nh, d) if shapes is not None and dynamic else None
    if split is None:
        split = e.const([rows, seq_len, nh, d], np.int64, "shape")

    def heads(x: str, perm: list[int]) -> str:
        return e.op("Transpose", [e.op("Reshape", [x, split])], perm=perm)

    q4 = heads(q, [0, 2, 1, 3])  # [R, nh, S, d]
    # Transposing K straight to [R, nh, d, S] saves a separate transpose of the scores' operand.
    kt = heads(k, [0, 2, 3, 1])  # [R, nh, d, S]
    v4 = heads(v, [0, 2, 1, 3])  # [R, nh, S, d]
    scores = e.op("MatMul", [q4, kt])
    # Divide after the matmul, as Hugging Face does, so rounding matches the reference order.
    scores = e.op("Div", [scores, e.const(math.sqrt(d), np.float32, "sqrt_head_dim")])
    probs = e.op("Softmax", [e.op("Add", [scores, bias])], axis=-1)
    context = e.op("MatMul", [probs, v4])  # [R, nh, S, d]
    context = e.op("Transpose", [context], perm=[0, 2, 1, 3])  # [R, S, nh, d]
    merged = -1 if dynamic else rows * seq_len
    return e.op("Reshape", [context, e.const([merged, h], np.int64, "shape")])


def _validate(
    config: BertConfig,
    weights: BertWeights,
    head: str,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    opset: int,
) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    for label, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_valid_num", max_valid_num),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if seq_len > config.max_length:
        raise ValueError(
            f"seq_len {seq_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            + (
                f" less the position offset {config.position_offset}"
                if config.position_offset
                else ""
            )
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
    form: InputForm | str,
    batch_size: int = 16,
    seq_len: int = 256,
    max_valid_num: int = 40,
    head: Head = "qa",
    opset: int = MIN_OPSET,
    dynamic: bool = False,
) -> onnx.ModelProto:
    """Build a static-shape (or, with ``dynamic``, dynamic-axes) fp32 BERT ONNX model.

    Inputs (all ``int32``): ``input_ids``, ``token_type_ids`` ``[batch_size, seq_len]`` always;
    ``position_ids`` ``[batch_size, seq_len]`` for ``packed`` and ``unpack_repack``;
    ``attention_mask`` ``[batch_size, seq_len]`` (segment ids for ``packed``, 0/1 for
    ``padded``); ``unpack_info`` ``[max_valid_num]`` sample lengths for ``unpack_repack``.

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
        form: The :class:`~packrunner.InputForm` (or its value, e.g. ``"packed"``).
        batch_size: Rows of the static batch.
        seq_len: Tokens per row; at most ``config.max_position_embeddings``.
        max_valid_num: Most samples per batch (unpack_repack) or segments per row (packed
            ``sentence_embedding``; segment ids above it are left out of that output).
        head: ``"qa"`` (span logits, needs ``qa_outputs.*`` weights) or ``"encoder"``.
        opset: Default-domain opset, at least 17.
        dynamic: Give the ``[batch_size, seq_len]`` inputs and outputs symbolic dims ``batch``
            and ``seq`` (packed and padded forms only): one model runs any batch shape, up to
            ``seq_len`` tokens wide (the positions the padded form's graph holds), with exactly
            the fixed build's computation at each shape. ``batch_size`` is then only recorded
            in the doc string.

    Returns:
        The checked model.

    Raises:
        ValueError: On an unknown form/head, non-positive sizes, unsupported opset, or
            ``dynamic`` with the unpack_repack form (its stream index is fixed-size).
        ModelFormatError: If the weights do not match ``config`` or lack a needed QA head.
    """
    form = InputForm.parse(form)
    # No defensive copy: every array is serialized into its own TensorProto right away.
    w = normalize_weights(config, weights, copy=False)
    _validate(config, w, head, batch_size, seq_len, max_valid_num, opset)
    if dynamic and form is InputForm.UNPACK_REPACK:
        raise ValueError("dynamic=True builds the packed and padded forms only")
    b, s, m, h = batch_size, seq_len, max_valid_num, config.hidden_size
    eps = config.layer_norm_eps
    graph = onnx.GraphProto(name=f"bert_{form}_{head}")
    e = NodeEmitter(GraphView(graph), opset=opset)
    # The [B, S] dims as they appear on value infos: symbols when dynamic.
    batch_dims: list[int | str] = ["batch", "seq"] if dynamic else [b, s]

    for name in _INPUTS[form]:
        shape = [m] if name == UNPACK_INFO else batch_dims
        graph.input.append(onnx.helper.make_tensor_value_info(e.view.reserve(name), _INT32, shape))
    shapes = _Shapes(e, rows=b, seq_len=s, dynamic=dynamic)

    # --- Embeddings: (word + token_type) + position, in Hugging Face's summation order. ---
    def embedding(table: str, ids: str) -> str:
        return e.op("Gather", [e.weight(table, w[table]), ids])

    word = embedding("embeddings.word_embeddings.weight", "input_ids")
    token_type = embedding("embeddings.token_type_embeddings.weight", "token_type_ids")
    offset = config.position_offset  # RoBERTa family: table rows from padding_idx + 1
    if form is InputForm.PADDED:
        # [S, H], broadcast over rows: every row starts at position 0.
        positions = e.const(np.arange(s) + offset, np.int32, "positions")
        if dynamic:  # the first `width` of them
            zero = e.const([0], np.int64, "index")
            positions = e.op("Slice", [positions, zero, shapes.width()], "positions")
    else:
        positions = "position_ids"  # [B, S]: 0..L-1 per sample
        if offset:
            positions = e.op("Add", [positions, e.const(offset, np.int32, "position_offset")])
    position = embedding("embeddings.position_embeddings.weight", positions)
    x = e.op("Add", [e.op("Add", [word, token_type]), position])
    # The encoder works on a 2-D [tokens, H] stream: Gemm needs 2-D input, LayerNorm and FFN are
    # token-wise anyway, and unpack_repack's stream is naturally flat.
    x = e.op("Reshape", [x, shapes.flat(h)])
    x = _layer_norm(e, x, "embeddings.LayerNorm", w, eps)

    # --- Attention bias (and, for unpack_repack, the stream <-> slot index maps). ---
    stream: StreamIndex | None = None
    if form is InputForm.PACKED:
        bias = block_diagonal_bias(e, "attention_mask")
        attn_rows = b
    elif form is InputForm.PADDED:
        bias = padding_bias(
            e, "attention_mask", batch_size=None if dynamic else b, seq_len=None if dynamic else s
        )
        attn_rows = b
    else:
        stream = StreamIndex(e, UNPACK_INFO, batch_size=b, seq_len=s, max_valid_num=m)
        bias = stream.attention_bias()
        attn_rows = m

    # --- Transformer layers (post-LayerNorm, as BERT). ---
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."
        # Projections run on the packed stream: fewer rows than the unpacked [M, S] view, and
        # token-wise, so packing cannot change them.
        q, k, v = (
            _dense(e, x, f"{p}attention.self.{proj}", w) for proj in ("query", "key", "value")
        )
        if stream is not None:
            q, k, v = (stream.unpack(t) for t in (q, k, v))  # [M, S, H]
        context = _attention_core(
            e, q, k, v, bias, rows=attn_rows, config=config, seq_len=s, shapes=shapes
        )
        if stream is not None:
            context = stream.repack(context)  # back to the [N, H] stream
        attn_out = _dense(e, context, f"{p}attention.output.dense", w)
        x = _layer_norm(e, e.op("Add", [attn_out, x]), f"{p}attention.output.LayerNorm", w, eps)
        ffn = _gelu(e, _dense(e, x, f"{p}intermediate.dense", w))
        ffn = _dense(e, ffn, f"{p}output.dense", w)
        x = _layer_norm(e, e.op("Add", [ffn, x]), f"{p}output.LayerNorm", w, eps)

    # --- Heads. ---
    outputs: list[onnx.ValueInfoProto]
    if head == "qa":
        qa_weight = e.weight(QA_WEIGHT, w[QA_WEIGHT])
        logits = e.op("Gemm", [x, qa_weight, e.weight(QA_BIAS, w[QA_BIAS])], transB=1)  # [N, 2]
        if stream is None:
            logits = e.op("Reshape", [logits, shapes.batch(2)])
            out_shape = batch_dims
        else:
            logits = stream.unpack_zeroed(logits, [2], _FLOAT, "logits")  # [M, S, 2]
            out_shape = [m, s]
        for index, name in enumerate(_OUTPUTS["qa"]):
            e.op("Gather", [logits, e.const(index, np.int64, "index")], axis=2, out=name)
        outputs = [
            onnx.helper.make_tensor_value_info(nm, _FLOAT, out_shape) for nm in _OUTPUTS["qa"]
        ]
    else:
        outputs = _encoder_head(e, x, form, stream, shapes, m=m, h=h)

    graph.node.extend(e.nodes)
    graph.output.extend(outputs)
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph,
        opset_imports=opsets,
        # The lowest IR version that can carry this opset: newest-IR files are rejected by older
        # runtimes for no benefit here.
        ir_version=onnx.helper.find_min_ir_version_for(opsets),
        producer_name="packrunner.models",
        doc_string=(
            f"BERT {config.num_layers}x{h} ({form}, head={head}, batch_size={b}, seq_len={s}, "
            f"max_valid_num={m}{', dynamic axes' if dynamic else ''})"
        ),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _encoder_head(
    e: NodeEmitter,
    x: str,
    form: InputForm,
    stream: StreamIndex | None,
    shapes: _Shapes,
    *,
    m: int,
    h: int,
) -> list[onnx.ValueInfoProto]:
    """``last_hidden_state`` and mean-pooled ``sentence_embedding`` outputs.

    Pooling is a matmul with a 0/1 membership matrix (then a divide by the token count, floored at
    1 so empty segments/slots give 0 rather than 0/0 = NaN): one batched GEMM instead of a
    per-segment loop.
    """
    one = e.const(1.0, np.float32, "one")
    b, s = shapes.rows, shapes.seq_len
    if stream is not None:
        last = stream.unpack_zeroed(x, [h], _FLOAT, out="last_hidden_state")  # [M, S, H]
        member = e.op("Cast", [e.with_axes("Unsqueeze", stream.valid, [1])], to=_FLOAT)  # [M,1,S]
        sums = e.op("Reshape", [e.op("MatMul", [member, last]), e.const([m, h], np.int64)])
        counts = e.op("Cast", [e.with_axes("Unsqueeze", stream.lengths, [1])], to=_FLOAT)  # [M,1]
        e.op("Div", [sums, e.op("Max", [counts, one])], out="sentence_embedding")
        return [
            onnx.helper.make_tensor_value_info("last_hidden_state", _FLOAT, [m, s, h]),
            onnx.helper.make_tensor_value_info("sentence_embedding", _FLOAT, [m, h]),
        ]

    hidden = e.op("Reshape", [x, shapes.batch(h)], out="last_hidden_state")
    rows: int | str = "batch" if shapes.dynamic else b
    batch_dims: list[int | str] = [rows, "seq" if shapes.dynamic else s]
    if form is InputForm.PACKED:
        segment_ids = e.const(np.arange(1, m + 1).reshape(1, m, 1), np.int32, "segment_ids")
        keys = e.with_axes("Unsqueeze", "attention_mask", [1])  # [B, 1, S]
        member = e.op("Cast", [e.op("Equal", [keys, segment_ids])], to=_FLOAT)  # [B, M, S]
        counts = e.with_axes("ReduceSum", member, [2], keepdims=1)  # [B, M, 1]
        sums = e.op("MatMul", [member, hidden])  # [B, M, H]
        pooled_shape = [rows, m, h]
    else:
        mask_f = e.op("Cast", ["attention_mask"], to=_FLOAT)
        if shapes.dynamic:
            member = e.with_axes("Unsqueeze", mask_f, [1])  # [B, 1, S]
        else:
            member = e.op("Reshape", [mask_f, e.const([b, 1, s], np.int64, "shape")])
        counts = e.with_axes("ReduceSum", mask_f, [1], keepdims=1)  # [B, 1]
        rows_h = [-1 if shapes.dynamic else b, h]
        sums = e.op("Reshape", [e.op("MatMul", [member, hidden]), e.const(rows_h, np.int64)])
        pooled_shape = [rows, h]
    e.op("Div", [sums, e.op("Max", [counts, one])], out="sentence_embedding")
    return [
        onnx.helper.make_tensor_value_info("last_hidden_state", _FLOAT, [*batch_dims, h]),
        onnx.helper.make_tensor_value_info("sentence_embedding", _FLOAT, pooled_shape),
    ]
