"""Attention in one node: ONNX ``Attention`` (opset 23) and onnxruntime's fused forms; opset 11.

The converted models run under packrunner's engine (PackRunner + OnnxDevice) on samples of
lengths ``1 .. seq_len``, each sample's outputs compared with the unconverted model run on that
sample alone; a negative control per form shows the comparison bites.

* ``com.microsoft`` ``Attention`` / ``MultiHeadAttention``: the tiny BERT fixture through
  onnxruntime's transformer optimizer (EmbedLayerNormalization fusion off: it hides the position
  lookup and stays refused by name, see test_convert_encoders);
* ONNX ``Attention``: a hand-built one-layer encoder (onnx.helper) with a padding mask, with
  ``is_causal``, and with a constant (input-free) mask that the bias is added to;
* opset 11 (PopRT's exports): unpack/repack, upgraded internally.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from packrunner import InputForm, PackRunner, RunnerConfig
from packrunner.config import PackAlgorithm
from packrunner.convert import ConversionError, convert_file, convert_to_packed, explain
from packrunner.devices.onnx import OnnxDevice
from packrunner.errors import ConfigError
from tests._support import Sample, pack_first_fit, token_samples

from ._support import (
    fill_lengths,
    fixture_path,
    make_session,
    per_sample_max_diff,
    record_diff,
    run,
    run_single,
    stream_pack,
)

BATCH, SEQ, MAX_VALID = 4, 64, 24
TOLERANCE = 1e-5
HIDDEN, HEADS, VOCAB, POSITIONS = 8, 2, 50, 128


def _engine_diff(
    path: Path,
    form: InputForm,
    samples: list[Sample],
    original: Path | bytes,
    inputs: tuple[str, ...] = ("input_ids", "token_type_ids"),
) -> float:
    """Max abs diff of every sample's engine result vs the original run on it alone."""
    algorithm = PackAlgorithm.STREAM if form is InputForm.UNPACK_REPACK else PackAlgorithm.FIRST_FIT
    config = RunnerConfig(
        algorithm=algorithm,
        batch_size=BATCH,
        seq_len=SEQ,
        max_valid_num=MAX_VALID,
        timeout_us=2_000,
    )
    with (
        PackRunner(OnnxDevice(path, intra_op_num_threads=2), config) as runner,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        futures = [
            pool.submit(runner.execute, {n: getattr(s, n) for n in inputs}, timeout=60)
            for s in samples
        ]
        results = [f.result() for f in futures]
    reference = make_session(original)
    worst = 0.0
    for sample, result in zip(samples, results, strict=True):
        want = run_single(reference, sample)
        for name, got in result.items():
            worst = max(worst, float(np.abs(got - want[name][0]).max()))
    return worst


def _lengths(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [SEQ, 1, SEQ - 1, 2, *(int(n) for n in rng.integers(1, SEQ + 1, size=16))]


# -- onnxruntime's fused forms -------------------------------------------------------------------


def _fused(tmp_path: Path, multi_head: bool) -> Path:
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False  # refused by name (test_convert_encoders)
    options.use_multi_head_attention = multi_head
    fused = optimize_model(
        str(fixture_path("tiny_hf_bert_qa")),
        model_type="bert",
        num_heads=2,
        hidden_size=32,
        opt_level=0,
        optimization_options=options,
    )
    path = tmp_path / f"fused_{'mha' if multi_head else 'attention'}.onnx"
    fused.save_model_to_file(str(path))
    return path


@pytest.mark.parametrize("multi_head", [False, True], ids=["Attention", "MultiHeadAttention"])
def test_fused_attention_converts(
    multi_head: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fused = _fused(tmp_path, multi_head)
    op = "MultiHeadAttention" if multi_head else "Attention"
    assert {n.op_type for n in onnx.load(str(fused)).graph.node if n.domain} >= {op}
    with pytest.raises(ConfigError, match="fused attention"):
        OnnxDevice(fused, batch_size=BATCH, seq_len=SEQ)  # unconverted: refused, as before
    out = tmp_path / "packed.onnx"
    converted = convert_file(fused, out, batch_size=BATCH, seq_len=SEQ)
    assert f"2 com.microsoft::{op} ops take the block-diagonal bias" in explain(converted)
    samples = token_samples(np.random.default_rng(31), _lengths(31), 128)
    diff = _engine_diff(out, InputForm.PACKED, samples, fixture_path("tiny_hf_bert_qa"))
    record_diff(request, diff)
    assert diff <= TOLERANCE


def test_fused_attention_negative_control(tmp_path: Path) -> None:
    # The fused model in padded form (its own padding mask kept) fed packed rows.
    padded = convert_to_packed(
        _fused(tmp_path, multi_head=False), batch_size=BATCH, seq_len=SEQ, form="padded"
    )
    rng = np.random.default_rng(32)
    samples = token_samples(rng, fill_lengths(rng, BATCH, SEQ), 128)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ)
    feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    outputs = run(make_session(padded.SerializeToString()), feeds)
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    references = [run_single(original, s) for s in samples]
    assert per_sample_max_diff(outputs, placements, references) > 0.1


def test_fused_attention_unpack_repack_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="com.microsoft::Attention ops yet"):
        convert_to_packed(_fused(tmp_path, False), form="unpack_repack", seq_len=SEQ)


# -- ONNX Attention (opset 23) -------------------------------------------------------------------

OP23 = "tiny_hf_bert_attention_op23"


def test_dynamo_opset23_export_uses_the_attention_op() -> None:
    # torch 2.13's dynamo exporter emits ONNX Attention for SDPA at opset 23.
    model = onnx.load(str(fixture_path(OP23)))
    assert [n.op_type for n in model.graph.node].count("Attention") == 2
    assert not any(n.op_type == "Softmax" for n in model.graph.node)


def test_dynamo_opset23_export_converts(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = tmp_path / "packed.onnx"
    converted = convert_file(fixture_path(OP23), out, batch_size=BATCH, seq_len=SEQ)
    assert "2 ai.onnx::Attention ops take the block-diagonal bias" in explain(converted)
    samples = token_samples(np.random.default_rng(30), _lengths(30), 128)
    diff = _engine_diff(out, InputForm.PACKED, samples, fixture_path(OP23))
    record_diff(request, diff)
    assert diff <= TOLERANCE


def test_dynamo_opset23_negative_control() -> None:
    padded = convert_to_packed(fixture_path(OP23), batch_size=BATCH, seq_len=SEQ, form="padded")
    rng = np.random.default_rng(37)
    samples = token_samples(rng, fill_lengths(rng, BATCH, SEQ), 128)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ)
    feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    outputs = run(make_session(padded.SerializeToString()), feeds)
    original = make_session(fixture_path(OP23))
    references = [run_single(original, s) for s in samples]
    assert per_sample_max_diff(outputs, placements, references) > 0.1


def _encoder_with_attention_op(mask: str = "padding", *, causal: bool = False) -> onnx.ModelProto:
    """A one-layer encoder whose attention is one ONNX ``Attention`` node (opset 23).

    ``mask``: ``"padding"`` (bool ``[B, 1, 1, S]`` from attention_mask), ``"constant"`` (an
    additive ``[S, S]`` band computed from the sequence length only), ``"band_and_padding"``
    (both folded into one bool mask: refused), ``"none"``.
    """
    rng = np.random.default_rng(23)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    inits = [
        weight("words", VOCAB, HIDDEN),
        weight("positions", POSITIONS, HIDDEN),
        weight("wq", HIDDEN, HIDDEN),
        weight("wk", HIDDEN, HIDDEN),
        weight("wv", HIDDEN, HIDDEN),
        numpy_helper.from_array(np.arange(POSITIONS, dtype=np.int64)[None, :], "position_buffer"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_1d"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_1d"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes_12"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "band"),
        numpy_helper.from_array(np.array(-10000.0, dtype=np.float32), "drop"),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["length_1d"], start=1, end=2),
        helper.make_node("Slice", ["position_buffer", "zero_1d", "length_1d", "one_1d"], ["pos"]),
        helper.make_node("Gather", ["words", "input_ids"], ["word_emb"]),
        helper.make_node("Gather", ["positions", "pos"], ["pos_emb"]),
        helper.make_node("Add", ["word_emb", "pos_emb"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "wq"], ["q"]),
        helper.make_node("MatMul", ["hidden", "wk"], ["k"]),
        helper.make_node("MatMul", ["hidden", "wv"], ["v"]),
        # [S, S] from the length alone (reads no input's values): |i - j|, and all True
        helper.make_node("Squeeze", ["length_1d"], ["length"]),
        helper.make_node("Range", ["zero", "length", "one"], ["steps"]),
        helper.make_node("Unsqueeze", ["steps", "one_1d"], ["rows"]),
        helper.make_node("Unsqueeze", ["steps", "zero_1d"], ["cols"]),
        helper.make_node("Sub", ["rows", "cols"], ["distance"]),
        helper.make_node("Equal", ["distance", "distance"], ["everywhere"]),
        # padding: attention_mask[:, None, None, :] as bool (True = attend), [B, 1, S, S]
        # (onnxruntime wants the query axis of a mask spelled out)
        helper.make_node("Unsqueeze", ["attention_mask", "axes_12"], ["mask4"]),
        helper.make_node("Cast", ["mask4"], ["keys"], to=TensorProto.BOOL),
        helper.make_node("And", ["keys", "everywhere"], ["padding"]),
        # a band |i - j| <= 3
        helper.make_node("Abs", ["distance"], ["far"]),
        helper.make_node("LessOrEqual", ["far", "band"], ["near"]),
        helper.make_node("Not", ["near"], ["outside"]),
        helper.make_node("Cast", ["outside"], ["outside_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["outside_f", "drop"], ["band_bias"]),
        helper.make_node("And", ["padding", "near"], ["band_and_padding"]),
    ]
    inits += [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
    ]
    mask_input = {
        "padding": "padding",
        "constant": "band_bias",
        "band_and_padding": "band_and_padding",
        "none": "",
    }[mask]
    nodes.append(
        helper.make_node(
            "Attention",
            ["q", "k", "v", mask_input] if mask_input else ["q", "k", "v"],
            ["context"],
            q_num_heads=HEADS,
            kv_num_heads=HEADS,
            is_causal=int(causal),
        )
    )
    nodes.append(helper.make_node("Add", ["context", "hidden"], ["last_hidden_state"]))
    token = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "attention_op_encoder",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, token)
            for name in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*token, HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    ("mask", "causal"),
    [("padding", False), ("padding", True), ("constant", False), ("none", False)],
    ids=["padding-mask", "padding-mask-causal", "constant-band-kept", "no-mask"],
)
def test_onnx_attention_op_converts(
    mask: str, causal: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    original = _encoder_with_attention_op(mask, causal=causal)
    out = tmp_path / "packed.onnx"
    converted = convert_to_packed(original, batch_size=BATCH, seq_len=SEQ)
    onnx.save(converted, str(out))
    notes = explain(converted)
    assert "rewrote: 1 ai.onnx::Attention ops take" in notes
    assert ("added to a constant mask" in notes) == (mask == "constant")
    (attention,) = [n for n in converted.graph.node if n.op_type == "Attention"]
    assert next(a.i for a in attention.attribute if a.name == "is_causal") == int(causal)
    samples = token_samples(np.random.default_rng(33), _lengths(33), VOCAB)
    diff = _engine_diff(
        out, InputForm.PACKED, samples, original.SerializeToString(), inputs=("input_ids",)
    )
    record_diff(request, diff)
    assert diff <= TOLERANCE


def test_onnx_attention_op_negative_control() -> None:
    # The padded form keeps the exported padding mask: packed rows then mix their samples.
    original = _encoder_with_attention_op("padding")
    padded = convert_to_packed(original, batch_size=BATCH, seq_len=SEQ, form="padded")
    rng = np.random.default_rng(34)
    samples = token_samples(rng, fill_lengths(rng, BATCH, SEQ), VOCAB)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ)
    feeds = {
        "input_ids": feeds["input_ids"],
        "attention_mask": (feeds["attention_mask"] > 0).astype(np.int32),
        "position_ids": feeds["position_ids"],
    }
    outputs = run(make_session(padded.SerializeToString()), feeds)
    reference = make_session(original.SerializeToString())
    references = [run_single(reference, s) for s in samples]
    assert per_sample_max_diff(outputs, placements, references) > 0.1


def test_onnx_attention_op_band_folded_into_padding_is_refused() -> None:
    with pytest.raises(ConversionError, match="restricts attention beyond padding"):
        convert_to_packed(_encoder_with_attention_op("band_and_padding"), batch_size=2, seq_len=16)


def test_onnx_attention_op_with_kv_cache_is_refused() -> None:
    model = _encoder_with_attention_op("padding")
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    attention.input.extend(["k", "v"])  # past key / value: a decoder
    with pytest.raises(ConversionError, match="takes a KV cache"):
        convert_to_packed(model, batch_size=2, seq_len=16)


# -- opset 11 (PopRT's exports) ------------------------------------------------------------------


def test_opset11_unpack_repack_under_the_engine(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / "stream.onnx"
    converted = convert_file(
        fixture_path("tiny_hf_bert_opset11"),
        out,
        batch_size=BATCH,
        seq_len=SEQ,
        form="unpack_repack",
        max_valid_num=MAX_VALID,
    )
    assert "upgraded: ai.onnx opset 11 -> 17" in explain(converted)
    samples = token_samples(np.random.default_rng(35), _lengths(35), 128)
    diff = _engine_diff(out, InputForm.UNPACK_REPACK, samples, fixture_path("tiny_hf_bert_opset11"))
    record_diff(request, diff, " (unpack_repack)")
    assert diff <= TOLERANCE


def test_opset11_unpack_repack_negative_control() -> None:
    # unpack_info that merges the first two samples into one: they then attend to each other.
    converted = convert_to_packed(
        fixture_path("tiny_hf_bert_opset11"),
        batch_size=BATCH,
        seq_len=SEQ,
        form="unpack_repack",
        max_valid_num=MAX_VALID,
    )
    rng = np.random.default_rng(36)
    samples = token_samples(rng, [20, 30, 9, 64, 1], 128)
    feeds, placements = stream_pack(samples, BATCH, SEQ, MAX_VALID)
    session = make_session(converted.SerializeToString())
    original = make_session(fixture_path("tiny_hf_bert_opset11"))
    references = [run_single(original, s) for s in samples]
    assert per_sample_max_diff(run(session, feeds), placements, references) <= TOLERANCE
    merged = feeds["unpack_info"].copy()
    merged[0], merged[1:-1] = merged[0] + merged[1], merged[2:]
    feeds["unpack_info"] = merged
    outputs = run(session, feeds)
    first = outputs["last_hidden_state"][0, : samples[0].length]
    assert float(np.abs(first - references[0]["last_hidden_state"][0]).max()) > 0.1
