"""Tests of packrunner.convert on committed Hugging Face BERT exports (onnxruntime only, no torch).

The fixtures in tests/fixtures were made by ``tests/fixtures/make_tiny_hf_bert.py``: tiny random
BERTs (hidden 32, 2 layers, 2 heads, intermediate 64, max_position_embeddings 512, weights from a
fixed seed) exported with ``torch.onnx.export`` (torch 2.13.0+cpu, transformers 5.24.0) with
dynamic batch/sequence axes and int64 inputs, the way a user exports a Hugging Face model:

* ``tiny_hf_bert_qa``: BertForQuestionAnswering, eager attention, legacy TorchScript exporter;
  mask built once as ``Where(..., 0, finfo.min)`` from ``Shape(hidden_states)``, ``[B,1,S,S]``.
* ``tiny_hf_bert_base_sdpa``: BertModel, SDPA attention, legacy exporter; a ``Where(mask, 0, -inf)``
  per layer and an ``IsNaN`` guard after each Softmax.
* ``tiny_hf_bert_base_tf4``: BertModel exported under transformers 4.36.2: the classic
  ``Unsqueeze-Unsqueeze-Cast-Sub-Mul`` ``[B,1,1,S]`` extended mask.
* ``tiny_hf_bert_qa_dynamo``: BertForQuestionAnswering through the torch.export-based exporter.

The reference for every packed sample is the *unconverted* fixture run on that sample alone
(batch 1, its own length, a mask of ones), so a pass means the packed model computes exactly what
the original computes per sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packrunner.cli import main as cli_main
from packrunner.convert import (
    PACKED_INPUT_NAMES,
    ConversionError,
    convert_file,
    convert_to_packed,
)
from packrunner.graphs import MASK_BIAS
from tests._support import Placement, Sample, pack_first_fit, token_samples

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

FIXTURES = [
    "tiny_hf_bert_qa",
    "tiny_hf_bert_base_sdpa",
    "tiny_hf_bert_base_tf4",
    "tiny_hf_bert_qa_dynamo",
]
VOCAB = 128  # the smallest fixture vocabulary; token ids below it are valid for all
TOLERANCE = 1e-5
BATCH, SEQ = 16, 256
ROWS_USED = 14  # the last two rows stay all padding


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def converted(fixture_name: str) -> onnx.ModelProto:
    return convert_to_packed(fixture_path(fixture_name))


def _packed_batch(
    seed: int,
) -> tuple[dict[str, npt.NDArray[np.int32]], list[Placement], list[Sample]]:
    rng = np.random.default_rng(seed)
    samples = token_samples(rng, fill_lengths(rng, ROWS_USED, SEQ), VOCAB)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ, rows_used=ROWS_USED)
    return feeds, placements, samples


def test_conversion_error_is_a_value_error() -> None:
    assert issubclass(ConversionError, ValueError)


def test_io_contract(converted: onnx.ModelProto) -> None:
    inputs = {i.name: i.type.tensor_type for i in converted.graph.input}
    assert list(inputs) == list(PACKED_INPUT_NAMES)
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == TensorProto.INT32
        assert [d.dim_value for d in tensor_type.shape.dim] == [BATCH, SEQ]
    for output in converted.graph.output:
        dims = output.type.tensor_type.shape.dim
        assert [d.dim_value for d in dims][:2] == [BATCH, SEQ], output.name
        assert all(d.HasField("dim_value") for d in dims), output.name
    props = {p.key: p.value for p in converted.metadata_props}
    # pooler_output (one vector per sample) is computed per segment: [batch, seq_len segments].
    layouts = dict(entry.split("=") for entry in props["packrunner.output_layouts"].split(";"))
    assert all(layouts[o.name] == "packed_tokens" for o in converted.graph.output[:1])
    if "pooler_output" in layouts:
        assert layouts["pooler_output"] == "segments"
    assert props["packrunner.packed"] == "batch_size=16;seq_len=256;form=packed"


def test_old_mask_subgraph_is_gone(converted: onnx.ModelProto) -> None:
    # The segment ids feed only the new block-diagonal bias: nothing reads them as a 0/1 mask.
    readers = [n for n in converted.graph.node if "attention_mask" in n.input]
    # Query segments (Unsqueeze), and key segments with padding made -1 (Greater, Where); with a
    # per-segment pooler_output, also the segment membership of its pooling (Unsqueeze).
    pooled = any(o.name == "pooler_output" for o in converted.graph.output)
    expected = ["Greater", "Unsqueeze", "Unsqueeze", "Where"] if pooled else None
    assert sorted(n.op_type for n in readers) == (expected or ["Greater", "Unsqueeze", "Where"])
    bias_values = [
        float(numpy_helper.to_array(t))
        for t in converted.graph.initializer
        if t.name.startswith("packrunner/block_mask/drop")
    ]
    assert bias_values == [MASK_BIAS]


def test_packed_outputs_equal_per_sample_outputs(
    fixture_name: str, converted: onnx.ModelProto, request: pytest.FixtureRequest
) -> None:
    feeds, placements, samples = _packed_batch(seed=1)
    assert {p.length for p in placements} >= {1, SEQ}
    assert max(np.bincount([p.row for p in placements])) >= 5  # really several per row
    outputs = run(make_session(converted.SerializeToString()), feeds)
    original = make_session(fixture_path(fixture_name))
    references = [run_single(original, s) for s in samples]

    diff = per_sample_max_diff(outputs, placements, references)
    record_diff(request, diff)
    assert diff <= TOLERANCE
    # All-padding rows (and padding tokens) give finite values, not NaN.
    for name, out in outputs.items():
        assert np.isfinite(out).all(), name


@pytest.mark.parametrize("control", ["0/1 mask", "padding-mode model", "row positions"])
def test_negative_controls_differ(
    fixture_name: str, converted: onnx.ModelProto, control: str
) -> None:
    feeds, placements, samples = _packed_batch(seed=2)
    model = converted
    if control == "0/1 mask":
        feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    elif control == "padding-mode model":
        model = convert_to_packed(fixture_path(fixture_name), form="padded")
        feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    else:  # positions counted from the row start, as an unconverted model would
        feeds["position_ids"] = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()
    outputs = run(make_session(model.SerializeToString()), feeds)
    original = make_session(fixture_path(fixture_name))
    references = [run_single(original, s) for s in samples]
    assert per_sample_max_diff(outputs, placements, references) > 0.1


def test_padding_mode_matches_one_sample_per_row() -> None:
    # With one sample per row, a 0/1 mask is all that is needed: padding mode must be exact.
    model = convert_to_packed(fixture_path("tiny_hf_bert_qa"), form="padded")
    rng = np.random.default_rng(3)
    # Longer than half a row each, so first-fit puts exactly one per row.
    lengths = [int(n) for n in rng.integers(SEQ // 2 + 1, SEQ + 1, size=BATCH)]
    samples = token_samples(rng, lengths, VOCAB)
    feeds, placements = pack_first_fit(samples, BATCH, SEQ)
    assert [p.row for p in placements] == list(range(BATCH))
    outputs = run(make_session(model.SerializeToString()), feeds)
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    diff = per_sample_max_diff(outputs, placements, [run_single(original, s) for s in samples])
    assert diff <= TOLERANCE


def test_all_padding_batch_is_finite(converted: onnx.ModelProto) -> None:
    feeds = {name: np.zeros((BATCH, SEQ), dtype=np.int32) for name in PACKED_INPUT_NAMES}
    for name, out in run(make_session(converted.SerializeToString()), feeds).items():
        assert np.isfinite(out).all(), name


def test_other_batch_shape() -> None:
    model = convert_to_packed(fixture_path("tiny_hf_bert_qa"), batch_size=3, seq_len=40)
    rng = np.random.default_rng(4)
    samples = token_samples(rng, [40, 1, 7, 20, 12, 5], VOCAB)
    feeds, placements = pack_first_fit(samples, 3, 40)
    assert feeds["input_ids"].shape == (3, 40)
    outputs = run(make_session(model.SerializeToString()), feeds)
    assert outputs["start_logits"].shape == (3, 40)
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    diff = per_sample_max_diff(outputs, placements, [run_single(original, s) for s in samples])
    assert diff <= TOLERANCE


def test_node_and_tensor_names_do_not_matter() -> None:
    # Found by data flow, not names: scramble every node, initializer and edge name.
    original = onnx.load(str(fixture_path("tiny_hf_bert_base_tf4")))
    scrambled = onnx.compose.add_prefix(
        original, prefix="zz_", rename_inputs=False, rename_outputs=False
    )
    for index, node in enumerate(scrambled.graph.node):
        node.name = f"n{len(scrambled.graph.node) - index}"
    model = convert_to_packed(scrambled)
    feeds, placements, samples = _packed_batch(seed=5)
    outputs = run(make_session(model.SerializeToString()), feeds)
    reference = make_session(fixture_path("tiny_hf_bert_base_tf4"))
    diff = per_sample_max_diff(outputs, placements, [run_single(reference, s) for s in samples])
    assert diff <= TOLERANCE


def test_input_model_is_not_modified() -> None:
    original = onnx.load(str(fixture_path("tiny_hf_bert_qa")))
    before = original.SerializeToString()
    convert_to_packed(original)
    assert original.SerializeToString() == before


def test_keep_row_outputs() -> None:
    model = convert_to_packed(fixture_path("tiny_hf_bert_base_sdpa"), keep_row_outputs=True)
    shapes = {
        o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output
    }
    assert shapes == {"last_hidden_state": [BATCH, SEQ, 32], "pooler_output": [BATCH, 32]}


def test_external_data_model(tmp_path: Path) -> None:
    source = onnx.load(str(fixture_path("tiny_hf_bert_qa")))
    path = tmp_path / "exported.onnx"
    onnx.save_model(source, str(path), save_as_external_data=True, location="exported.onnx.data")
    assert (tmp_path / "exported.onnx.data").exists()
    out = tmp_path / "packed" / "packed.onnx"
    convert_file(path, out, batch_size=2, seq_len=32)
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [
        2,
        32,
    ]


# -- unpack/repack (stream mode) -----------------------------------------------------------------

MAX_VALID = 40


@pytest.fixture(scope="module")
def unpack_model(fixture_name: str) -> onnx.ModelProto:
    return convert_to_packed(
        fixture_path(fixture_name), form="unpack_repack", max_valid_num=MAX_VALID
    )


def _stream_batch(
    seed: int,
) -> tuple[dict[str, npt.NDArray[np.int32]], list[Placement], list[Sample]]:
    rng = np.random.default_rng(seed)
    lengths = [SEQ, 1, SEQ - 1, 2]  # the 3rd sample crosses from row 1 into row 2
    while len(lengths) < MAX_VALID - 3:  # leave some slots empty
        n = int(rng.integers(1, 200))
        if sum(lengths) + n > BATCH * SEQ - 100:  # and some stream padding at the end
            break
        lengths.append(n)
    samples = token_samples(rng, lengths, VOCAB)
    feeds, placements = stream_pack(samples, BATCH, SEQ, MAX_VALID)
    return feeds, placements, samples


def test_unpack_repack_io_contract(unpack_model: onnx.ModelProto) -> None:
    inputs = {
        i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in unpack_model.graph.input
    }
    assert inputs == {
        "input_ids": [BATCH, SEQ],
        "token_type_ids": [BATCH, SEQ],
        "position_ids": [BATCH, SEQ],
        "unpack_info": [MAX_VALID],
    }
    assert all(i.type.tensor_type.elem_type == TensorProto.INT32 for i in unpack_model.graph.input)
    props = {p.key: p.value for p in unpack_model.metadata_props}
    layouts = dict(entry.split("=") for entry in props["packrunner.output_layouts"].split(";"))
    for output in unpack_model.graph.output:
        dims = [d.dim_value for d in output.type.tensor_type.shape.dim]
        if output.name == "pooler_output":  # one vector per sample slot
            assert layouts[output.name] == "samples"
            assert dims == [MAX_VALID, 32]
        else:
            assert layouts[output.name] == "sample_tokens"
            assert dims[:2] == [MAX_VALID, SEQ]
    # Token-wise layers stay on the [B, S] stream; only attention runs per sample slot.
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in unpack_model.graph.value_info
    }
    softmax_shapes = [
        shapes[n.output[0]] for n in unpack_model.graph.node if n.op_type == "Softmax"
    ]
    assert softmax_shapes and all(
        s[0] == MAX_VALID and s[-2:] == [SEQ, SEQ] for s in softmax_shapes
    )
    layer_norms = [
        shapes[n.output[0]] for n in unpack_model.graph.node if n.op_type == "LayerNormalization"
    ]
    assert all(s[:2] == [BATCH, SEQ] for s in layer_norms)


def test_unpack_repack_equals_per_sample_outputs(
    fixture_name: str, unpack_model: onnx.ModelProto, request: pytest.FixtureRequest
) -> None:
    feeds, placements, samples = _stream_batch(seed=8)
    outputs = run(make_session(unpack_model.SerializeToString()), feeds)
    original = make_session(fixture_path(fixture_name))
    diff = per_sample_max_diff(outputs, placements, [run_single(original, s) for s in samples])
    record_diff(request, diff, " (unpack_repack)")
    assert diff <= TOLERANCE
    for name, out in outputs.items():
        assert np.isfinite(out).all(), name
        if out.shape[1:2] == (SEQ,):  # per token (pooler_output is one vector per slot)
            for place in placements:  # zero past each sample's length ...
                assert not out[place.row, place.length :].any(), name
        assert not out[len(placements) :].any(), name  # ... and in unused slots


def test_unpack_repack_negative_control(fixture_name: str, unpack_model: onnx.ModelProto) -> None:
    # Tell the model two neighbouring samples are one: the first then attends to the second.
    feeds, placements, samples = _stream_batch(seed=9)
    info = feeds["unpack_info"]
    k = next(k for k in range(len(samples) - 1) if info[k] + info[k + 1] <= SEQ)
    info[k:-1] = np.concatenate([[info[k] + info[k + 1]], info[k + 2 :]])
    outputs = run(make_session(unpack_model.SerializeToString()), feeds)
    reference = run_single(make_session(fixture_path(fixture_name)), samples[k])
    name = next(iter(outputs))
    merged = outputs[name][k, : samples[k].length]
    assert float(np.max(np.abs(merged - reference[name][0]))) > 0.1


def test_unpack_repack_empty_batch(unpack_model: onnx.ModelProto) -> None:
    feeds: dict[str, npt.NDArray[np.int32]] = {
        n: np.zeros((BATCH, SEQ), dtype=np.int32)
        for n in ("input_ids", "token_type_ids", "position_ids")
    }
    feeds["unpack_info"] = np.zeros(MAX_VALID, dtype=np.int32)
    for name, out in run(make_session(unpack_model.SerializeToString()), feeds).items():
        assert np.isfinite(out).all() and not out.any(), name


def test_unpack_repack_rejects_keep_row_outputs() -> None:
    with pytest.raises(ValueError, match="keep_row_outputs cannot be combined"):
        convert_to_packed(
            fixture_path("tiny_hf_bert_base_sdpa"), form="unpack_repack", keep_row_outputs=True
        )


def test_cli_unpack_repack(tmp_path: Path) -> None:
    out = tmp_path / "stream.onnx"
    argv = [str(fixture_path("tiny_hf_bert_qa")), str(out), "--form", "unpack_repack"]
    shape = ["--max-valid-num", "8", "--batch-size", "2", "--seq-len", "32"]
    assert cli_main(["convert", *argv, *shape]) == 0
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [8, 32]


def test_cli_form_vocabulary_and_the_hidden_attention_alias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(fixture_path("tiny_hf_bert_qa"))
    shape = ["--batch-size", "2", "--seq-len", "32"]
    assert (
        cli_main(["convert", source, str(tmp_path / "a.onnx"), "--attention", "padding", *shape])
        == 0
    )
    assert "form=padded" in capsys.readouterr().out
    bad = ["convert", source, str(tmp_path / "b.onnx"), "--form", "block_diagonal"]
    assert cli_main(bad) == 2
    assert "invalid form value: 'block_diagonal'" in capsys.readouterr().err


# -- errors ------------------------------------------------------------------------------------


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _token_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def test_not_bert_add_model() -> None:
    model = _model(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [],
    )
    with pytest.raises(
        ConversionError, match=r"graph input 'input_ids' not found \(inputs: \['x', 'y'\]\)"
    ):
        convert_to_packed(model)


def _embeddings_only(*, position_from_input_ids: bool = False) -> onnx.ModelProto:
    """Word + position embeddings with no attention at all (inputs like a BERT's)."""
    rng = np.random.default_rng(0)
    words = numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "words")
    positions = numpy_helper.from_array(rng.normal(size=(512, 4)).astype(np.float32), "positions")
    consts = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (("zero", 0), ("one", 1), ("axis0", [0]))
    ]
    position_indices = "input_ids" if position_from_input_ids else "pos2d"
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "axis0"], ["pos2d"]),
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["positions", position_indices], ["p"]),
        helper.make_node("Add", ["w", "p"], ["hidden"]),
    ]
    return _model(
        nodes,
        [_token_input("input_ids"), _token_input("attention_mask")],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [words, positions, *consts],
    )


def test_no_attention_softmax() -> None:
    model = _embeddings_only()
    with pytest.raises(
        ConversionError, match="attention mask subgraph not found: no attention Softmax"
    ):
        convert_to_packed(model)
    # The same graph converts in padding mode, which needs no mask subgraph.
    padded = convert_to_packed(model, form="padded", batch_size=2, seq_len=8)
    assert [i.name for i in padded.graph.input] == ["input_ids", "attention_mask", "position_ids"]


def test_no_position_gather() -> None:
    with pytest.raises(ConversionError, match="no position-embedding lookup found"):
        convert_to_packed(_embeddings_only(position_from_input_ids=True))


def test_positions_computed_from_input_ids_in_fixture() -> None:
    # A RoBERTa-style graph (positions derived from input_ids) is not a BERT position buffer.
    model = onnx.load(str(fixture_path("tiny_hf_bert_qa")))
    gather = next(
        n
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0].endswith("position_embeddings.weight")
    )
    gather.input[1] = "input_ids"
    with pytest.raises(ConversionError, match="no position-embedding lookup found"):
        convert_to_packed(model)


def test_fixture_with_mask_subgraph_deleted() -> None:
    model = onnx.load(str(fixture_path("tiny_hf_bert_qa")))
    producers = {out: node for node in model.graph.node for out in node.output}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        add = producers[softmax.input[0]]
        assert add.op_type == "Add"
        # Feed Softmax the scaled scores directly, skipping the mask Add.
        softmax.input[0] = next(i for i in add.input if producers[i].op_type == "Mul")
    with pytest.raises(
        ConversionError,
        match="attention mask subgraph not found: nothing that depends only on attention_mask",
    ):
        convert_to_packed(model)


def test_mask_also_used_elsewhere() -> None:
    # An extra output that reads attention_mask would see segment ids as a 0/1 mask: refuse.
    model = onnx.load(str(fixture_path("tiny_hf_bert_qa")))
    model.graph.node.append(
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    )
    model.graph.output.append(
        helper.make_tensor_value_info("mask_f", TensorProto.FLOAT, ["batch", "sequence"])
    )
    with pytest.raises(ConversionError, match="attention_mask still feeds"):
        convert_to_packed(model)


def test_seq_len_longer_than_position_table() -> None:
    with pytest.raises(ConversionError, match="seq_len 600 exceeds the 512 rows"):
        convert_to_packed(fixture_path("tiny_hf_bert_qa"), seq_len=600)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"seq_len": -1}, "seq_len must be >= 1, got -1"),
        ({"form": "causal"}, "form must be one of"),
        ({"max_valid_num": 0}, "max_valid_num must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_to_packed(fixture_path("tiny_hf_bert_qa"), **kwargs)  # type: ignore[arg-type]


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ConversionError, match="is not an ONNX model"):
        convert_to_packed(path)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "packed.onnx"
    argv = [str(fixture_path("tiny_hf_bert_qa")), str(out), "--batch-size", "4", "--seq-len", "64"]
    assert cli_main(["convert", *argv, "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    assert "positions: range lookup" in printed and "self-check: packed vs each sample" in printed
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(6)
    samples = token_samples(rng, [64, 30, 30, 4, 1, 17], VOCAB)
    feeds, placements = pack_first_fit(samples, 4, 64)
    outputs = run(make_session(out), feeds)
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    diff = per_sample_max_diff(outputs, placements, [run_single(original, s) for s in samples])
    assert diff <= TOLERANCE


def test_cli_reports_conversion_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "add.onnx"
    onnx.save(
        _model(
            [helper.make_node("Add", ["x", "x"], ["z"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
            [],
        ),
        str(source),
    )
    assert cli_main(["convert", str(source), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "packrunner convert: error:" in err and "graph input 'input_ids' not found" in err
    assert not (tmp_path / "out.onnx").exists()
    assert cli_main(["convert", str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_rejects_bad_sizes(tmp_path: Path) -> None:
    argv = ["convert", str(fixture_path("tiny_hf_bert_qa")), str(tmp_path / "o.onnx")]
    assert cli_main([*argv, "--seq-len", "0"]) == 2
    assert cli_main([*argv, "--attention", "unpack_repack", "--keep-row-outputs"]) == 2
