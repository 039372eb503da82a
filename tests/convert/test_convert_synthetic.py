"""packrunner.convert on a hand-built one-layer BERT-like graph, at opset 12 and at opset 17.

The exported fixtures are all opset >= 17; this graph covers the opset < 13 forms (``Unsqueeze``
and ``Squeeze`` take ``axes`` as an attribute), which the converter must also emit for its own
nodes. The graph has BERT's skeleton (word + token-type + position embeddings from a sliced
``position_ids`` buffer, the classic ``Unsqueeze-Unsqueeze-Cast-Sub-Mul`` extended mask added to
``QK^T`` before Softmax) but no learned projections.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packrunner.convert import convert_to_packed, explain
from tests._support import pack_first_fit, token_samples

from ._support import make_session, per_sample_max_diff, run, run_single, stream_pack

HIDDEN, VOCAB, POSITIONS = 8, 50, 64
BATCH, SEQ = 4, 32


def _bert_like(opset: int, *, slice_name: str = "position_slice") -> onnx.ModelProto:
    rng = np.random.default_rng(opset)
    inits = [
        numpy_helper.from_array(rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32), "words"),
        numpy_helper.from_array(rng.normal(size=(2, HIDDEN)).astype(np.float32), "types"),
        numpy_helper.from_array(
            rng.normal(size=(POSITIONS, HIDDEN)).astype(np.float32), "positions"
        ),
        numpy_helper.from_array(np.arange(POSITIONS, dtype=np.int64)[None, :], "position_buffer"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one_i"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_1d"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_1d"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one_f"),
        numpy_helper.from_array(np.array(-10000.0, dtype=np.float32), "big_negative"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale"),
    ]

    def axes_op(op: str, data: str, out: str, axis: int) -> list[onnx.NodeProto]:
        if opset >= 13:
            name = f"{out}_axes"
            inits.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), name))
            return [helper.make_node(op, [data, name], [out])]
        return [helper.make_node(op, [data], [out], axes=[axis])]

    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one_i"], ["length"], axis=0),
        *axes_op("Unsqueeze", "length", "length_1d", 0),
        helper.make_node(
            "Slice", ["position_buffer", "zero_1d", "length_1d", "one_1d"], [slice_name]
        ),
        helper.make_node("Gather", ["words", "input_ids"], ["word_emb"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["type_emb"]),
        helper.make_node("Gather", ["positions", slice_name], ["pos_emb"]),
        helper.make_node("Add", ["word_emb", "type_emb"], ["emb0"]),
        helper.make_node("Add", ["emb0", "pos_emb"], ["hidden"]),
        # classic extended mask: (1 - mask[:, None, None, :]) * -10000
        *axes_op("Unsqueeze", "attention_mask", "mask3", 1),
        *axes_op("Unsqueeze", "mask3", "mask4", 2),
        helper.make_node("Cast", ["mask4"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one_f", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "big_negative"], ["extended_mask"]),
        # one head, Q = K = V = hidden
        *axes_op("Unsqueeze", "hidden", "h4", 1),
        helper.make_node("Transpose", ["h4"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["h4", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "extended_mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "h4"], ["context4"]),
        *axes_op("Squeeze", "context4", "context", 1),
        helper.make_node("Add", ["context", "hidden"], ["residual"]),
        helper.make_node("Tanh", ["residual"], ["last_hidden_state"]),
    ]
    token = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "bert_like",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, token)
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*token, HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    ("opset", "slice_name"),
    [(12, "position_slice"), (17, "position_slice"), (17, "position_ids")],
    ids=["opset12", "opset17", "internal-tensor-named-position_ids"],
)
def test_bert_like_graph(opset: int, slice_name: str) -> None:
    original = _bert_like(opset, slice_name=slice_name)
    converted = convert_to_packed(original, batch_size=BATCH, seq_len=SEQ)
    unsqueeze_axes_inputs = {len(n.input) for n in converted.graph.node if n.op_type == "Unsqueeze"}
    assert unsqueeze_axes_inputs == ({1} if opset < 13 else {2})

    rng = np.random.default_rng(7)
    samples = token_samples(rng, [SEQ, 1, 10, 9, 7, 3, 20, 12, 2], VOCAB)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ)
    reference = make_session(original.SerializeToString())
    references = [run_single(reference, s) for s in samples]
    session = make_session(converted.SerializeToString())
    assert per_sample_max_diff(run(session, feeds), placements, references) <= 1e-5

    feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    assert per_sample_max_diff(run(session, feeds), placements, references) > 0.1

    # Below opset 17 the export is upgraded for unpack/repack (see _converter._UNPACK_OPSET).
    stream = convert_to_packed(
        original, batch_size=BATCH, seq_len=SEQ, form="unpack_repack", max_valid_num=12
    )
    assert ("upgraded: ai.onnx opset 12 -> 17" in explain(stream)) == (opset < 17)
    feeds, placements = stream_pack(samples, BATCH, SEQ, 12)
    outputs = run(make_session(stream.SerializeToString()), feeds)
    assert per_sample_max_diff(outputs, placements, references) <= 1e-5
