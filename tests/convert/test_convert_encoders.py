"""The encoder matrix: each architecture x exporter fixture converted and checked per sample.

The fixtures (``tests/fixtures/make_tiny_hf_encoders.py``) are tiny random RoBERTa, XLM-RoBERTa,
MPNet, DistilBERT and token-type-less BERT exports. For each one that converts, the packed graph
(and the unpack/repack graph) is run on samples of lengths ``1 .. seq_len`` packed several to a
row, and every sample's outputs are compared with the *unconverted* export run on that sample
alone; a negative control per architecture shows the comparison bites. The README's model matrix
lists these numbers.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from packrunner.convert import ConversionError, convert_to_packed, explain
from packrunner.convert import _converter as converter_module
from packrunner.convert._match_positions import PositionLookup, find_position_lookup
from tests._support import Sample
from tests._support import pack_first_fit as pack

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

# fixture -> (position kind, table row of a sample's first token)
ENCODERS = {
    "tiny_hf_roberta_sdpa": ("padding_offset", 2),
    "tiny_hf_roberta_eager": ("padding_offset", 2),
    "tiny_hf_roberta_dynamo": ("padding_offset", 2),
    "tiny_hf_roberta_posids": ("input", 2),
    "tiny_hf_mpnet": ("padding_offset", 2),
    "tiny_hf_bert_notypes": ("range", 0),
    "tiny_hf_bert_opset11": ("range", 0),
    "tiny_hf_distilbert_dynamo": ("range", 0),
}
# Refused unpack/repack conversions, and why: MPNet's relative-position bias is computed once,
# outside the attention blocks, on the [B, S] row; per-sample slots would need it per slot.
# (An opset 11 export is upgraded to opset 17 for unpack/repack, its wrapped Softmax unwrapped:
# it converts.)
UNPACK_REFUSED = {
    "tiny_hf_mpnet": "from outside the attention block",
}
VOCAB = 128
# The RoBERTa family's pad token; samples never contain it (tokenizers put it only past the end).
PAD = 1
TOLERANCE = 1e-5
BATCH, SEQ, MAX_VALID = 4, 64, 24


def _samples(rng: np.random.Generator, lengths: list[int]) -> list[Sample]:
    return [
        Sample(
            input_ids=rng.integers(PAD + 1, VOCAB, size=n, dtype=np.int32),
            token_type_ids=np.zeros(n, dtype=np.int32),
        )
        for n in lengths
    ]


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def packed(encoder: str) -> onnx.ModelProto:
    return convert_to_packed(fixture_path(encoder), batch_size=BATCH, seq_len=SEQ)


def _references(encoder: str, samples: list[Sample]) -> list[dict[str, np.ndarray]]:
    original = make_session(fixture_path(encoder))
    offset = ENCODERS[encoder][1]
    return [run_single(original, s, position_offset=offset) for s in samples]


def test_position_kind_is_stated(encoder: str, packed: onnx.ModelProto) -> None:
    kind, offset = ENCODERS[encoder]
    props = {p.key: p.value for p in packed.metadata_props}
    assert props["packrunner.positions"] == f"kind={kind};offset={offset}"
    assert f"positions: {kind} lookup" in explain(packed)
    assert "self-check: packed vs each sample alone" in explain(packed)


def test_packed_equals_per_sample(
    encoder: str, packed: onnx.ModelProto, request: pytest.FixtureRequest
) -> None:
    rng = np.random.default_rng(5)
    samples = _samples(rng, fill_lengths(rng, BATCH, SEQ))
    feeds, placements = pack(samples, BATCH, SEQ)
    assert {p.length for p in placements} >= {1, SEQ}
    feeds = {i.name: feeds[i.name] for i in packed.graph.input}
    outputs = run(make_session(packed.SerializeToString()), feeds)
    diff = per_sample_max_diff(outputs, placements, _references(encoder, samples))
    record_diff(request, diff)
    assert diff <= TOLERANCE


def test_negative_control_row_positions(encoder: str, packed: onnx.ModelProto) -> None:
    # Positions counted from the row start, as an unconverted model would count them.
    rng = np.random.default_rng(6)
    samples = _samples(rng, fill_lengths(rng, BATCH, SEQ))
    feeds, placements = pack(samples, BATCH, SEQ)
    feeds["position_ids"] = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()
    feeds = {i.name: feeds[i.name] for i in packed.graph.input}
    outputs = run(make_session(packed.SerializeToString()), feeds)
    assert per_sample_max_diff(outputs, placements, _references(encoder, samples)) > 0.1


def test_negative_control_padding_mask(encoder: str) -> None:
    # A padded-form model fed packed rows: samples attend to their neighbours.
    model = convert_to_packed(fixture_path(encoder), form="padded", batch_size=BATCH, seq_len=SEQ)
    rng = np.random.default_rng(7)
    samples = _samples(rng, fill_lengths(rng, BATCH, SEQ))
    feeds, placements = pack(samples, BATCH, SEQ)
    feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    feeds = {i.name: feeds[i.name] for i in model.graph.input}
    outputs = run(make_session(model.SerializeToString()), feeds)
    assert per_sample_max_diff(outputs, placements, _references(encoder, samples)) > 0.1


def test_unpack_repack_equals_per_sample(encoder: str, request: pytest.FixtureRequest) -> None:
    if encoder in UNPACK_REFUSED:
        with pytest.raises(ConversionError, match=UNPACK_REFUSED[encoder]):
            convert_to_packed(fixture_path(encoder), form="unpack_repack", seq_len=SEQ)
        return
    model = convert_to_packed(
        fixture_path(encoder),
        form="unpack_repack",
        batch_size=BATCH,
        seq_len=SEQ,
        max_valid_num=MAX_VALID,
    )
    rng = np.random.default_rng(8)
    lengths = [SEQ, 1, SEQ - 1, 2, *(int(n) for n in rng.integers(1, 21, size=6))]  # <= 4 rows
    samples = _samples(rng, lengths)
    feeds, placements = stream_pack(samples, BATCH, SEQ, MAX_VALID)
    feeds = {i.name: feeds[i.name] for i in model.graph.input}
    outputs = run(make_session(model.SerializeToString()), feeds)
    diff = per_sample_max_diff(outputs, placements, _references(encoder, samples))
    record_diff(request, diff, " (unpack_repack)")
    assert diff <= TOLERANCE


def test_mpnet_relative_bias_table_is_never_rewritten() -> None:
    # MPNet's relative-attention bias table [32 buckets, heads] was once taken for the position
    # table at small shapes; only the table summed into the embeddings may read position_ids.
    for batch_size, seq_len in [(1, 32), (2, 48)]:
        model = convert_to_packed(
            fixture_path("tiny_hf_mpnet"), batch_size=batch_size, seq_len=seq_len
        )
        readers = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
        position_readers = {
            n.input[0]
            for n in model.graph.node
            if n.op_type == "Gather" and n.input[1].startswith("packrunner/positions")
        }
        assert position_readers == {"model.embeddings.position_embeddings.weight"}
        assert "model.encoder.relative_attention_bias.weight" in readers


def test_self_check_refuses_wrong_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    # A finder that got the offset wrong by one would give every sample wrong numbers: refused.
    found = find_position_lookup

    def off_by_one(*args: object, **kwargs: object) -> PositionLookup:
        lookup = found(*args, **kwargs)  # type: ignore[arg-type]
        assert lookup is not None
        return dataclasses.replace(lookup, offset=lookup.offset + 1)

    monkeypatch.setattr(converter_module, "find_position_lookup", off_by_one)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path("tiny_hf_roberta_sdpa"), batch_size=2, seq_len=16)


def test_self_check_refuses_a_mask_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A packed model whose mask was not replaced lets packed samples see each other: refused.
    monkeypatch.setattr(converter_module, "use_block_diagonal_bias", lambda *a, **k: set())
    monkeypatch.setattr(converter_module, "require_mask_replaced", lambda *a, **k: None)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path("tiny_hf_bert_notypes"), batch_size=2, seq_len=16)


def test_position_offset_given_or_inferred() -> None:
    source = onnx.load(str(fixture_path("tiny_hf_roberta_posids")))
    table = next(
        t for t in source.graph.initializer if t.name.endswith("position_embeddings.weight")
    )
    values = onnx.numpy_helper.to_array(table).copy()
    assert not values[1].any()  # the padding row the offset is inferred from
    values[1] = 0.5  # a checkpoint without the zero padding row: nothing to infer from ...
    table.CopyFrom(onnx.numpy_helper.from_array(values, table.name))
    inferred = convert_to_packed(source, batch_size=2, seq_len=16)
    assert "kind=input;offset=0" in str(inferred.metadata_props)
    given = convert_to_packed(source, batch_size=2, seq_len=16, position_offset=2)  # ... say it
    assert "kind=input;offset=2" in str(given.metadata_props)
    rng = np.random.default_rng(9)
    samples = _samples(rng, [16, 5, 1, 9])
    feeds, placements = pack(samples, 2, 16)
    feeds = {i.name: feeds[i.name] for i in given.graph.input}
    outputs = run(make_session(given.SerializeToString()), feeds)
    original = make_session(fixture_path("tiny_hf_roberta_posids"))
    references = [run_single(original, s, position_offset=2) for s in samples]
    assert per_sample_max_diff(outputs, placements, references) <= TOLERANCE


def test_position_offset_contradicting_the_export() -> None:
    with pytest.raises(ConversionError, match="position_offset=0 contradicts the export"):
        convert_to_packed(fixture_path("tiny_hf_roberta_sdpa"), seq_len=16, position_offset=0)


def test_table_rows_count_from_the_offset() -> None:
    # 514 rows, positions from row 2: 512 tokens fit, 513 do not.
    convert_to_packed(fixture_path("tiny_hf_roberta_eager"), batch_size=1, seq_len=512)
    with pytest.raises(ConversionError, match="seq_len 513 exceeds the 514 rows"):
        convert_to_packed(fixture_path("tiny_hf_roberta_eager"), batch_size=1, seq_len=513)


def test_fused_attention_is_refused_by_name(tmp_path: Path) -> None:
    # onnxruntime's transformer optimizer fuses attention and the embeddings into contrib ops.
    # Its Attention takes the block-diagonal bias (test_convert_attention_ops); the fused
    # embeddings hide the position lookup and are refused by name.
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(
        str(fixture_path("tiny_hf_bert_qa")),
        model_type="bert",
        num_heads=2,
        hidden_size=32,
        opt_level=0,
    )
    path = tmp_path / "fused.onnx"
    fused.save_model_to_file(str(path))
    with pytest.raises(
        ConversionError, match=r"fused ops \['com.microsoft::EmbedLayerNormalization'\]"
    ):
        convert_to_packed(path, batch_size=2, seq_len=16)


def test_cli_explain(tmp_path: Path) -> None:
    out = tmp_path / "roberta.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "packrunner.cli",
            "convert",
            str(fixture_path("tiny_hf_roberta_sdpa")),
            str(out),
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--explain",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "positions: padding_offset lookup" in result.stdout
    assert "cumsum(input_ids != 1) + 1" in result.stdout
    assert "now reads position_ids + 2" in result.stdout
    assert "self-check: packed vs each sample alone" in result.stdout
    assert out.exists()
