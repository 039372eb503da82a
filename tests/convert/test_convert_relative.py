"""Relative-position (DeBERTa-v3) and rotary (ModernBERT) encoders, converted and checked.

The fixtures (``tests/fixtures/make_tiny_hf_relative.py``) have no position table: DeBERTa-v3
reads log-bucketed relative positions (c2p / p2c), ModernBERT rotates Q and K and bands every
other layer to a 16-token sliding window (``SEQ`` is longer, so the band matters); a DeBERTa-v2
variant clips linear relative positions at +-16 and sums an absolute table as well. Both depend on
``i - j`` only, so the converter keeps the row's positions and replaces only the mask (adding
ModernBERT's band back). Every sample length ``1 .. SEQ`` is run packed through the converted
graph and compared with the *unconverted* export run on that sample alone; negative controls show
the comparisons bite. The README's model matrix lists these numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from packrunner import PackRunner, RunnerConfig
from packrunner.config import PackAlgorithm
from packrunner.convert import ConversionError, convert_file, convert_to_packed, explain
from packrunner.convert import _converter as converter_module
from packrunner.convert._match_positions import PositionKind, find_embedding_sum
from packrunner.convert._match_relative import find_row_invariant_positions
from packrunner.devices.onnx import OnnxDevice
from packrunner.graphs import GraphView
from tests._support import Sample
from tests._support import pack_first_fit as pack

from ._support import FloatArray, fixture_path, make_session, per_sample_max_diff, record_diff, run
from ._support import run_single as run_alone

# fixture -> (position kind, what --explain says about it)
ENCODERS = {
    # Clipped linear relative positions and an absolute table as well.
    "tiny_hf_debertav2_clipped": ("range", "relative buckets (row-invariant)"),
    "tiny_hf_debertav3_eager": ("relative", "relative buckets (row-invariant)"),
    "tiny_hf_debertav3_dynamo": ("relative", "relative buckets (row-invariant)"),
    "tiny_hf_modernbert_sdpa": ("rotary", "rotary (row-invariant)"),
    "tiny_hf_modernbert_eager": ("rotary", "rotary (row-invariant)"),
    "tiny_hf_modernbert_dynamo": ("rotary", "rotary (row-invariant)"),
}
MODERNBERT = sorted(name for name in ENCODERS if "modernbert" in name)
DEBERTA = sorted(name for name in ENCODERS if "debertav3" in name)
# Why each unpack/repack conversion is refused: the position terms (rotary cos/sin, relative
# embeddings) are computed once on the [B, S] row, outside the attention blocks.
UNPACK_REFUSED = {
    "tiny_hf_debertav2_clipped": "no probabilities @ V MatMul",
    "tiny_hf_debertav3_eager": "no probabilities @ V MatMul",
    "tiny_hf_debertav3_dynamo": "no probabilities @ V MatMul",
    "tiny_hf_modernbert_sdpa": "cannot trace the attention query",
    "tiny_hf_modernbert_eager": "cannot trace the attention query",
    "tiny_hf_modernbert_dynamo": "cannot trace the attention query",
}
VOCAB = 128
TOLERANCE = 1e-5
BATCH, SEQ = 4, 48  # ModernBERT's window is 16 tokens


@functools.cache
def _packed(encoder: str) -> onnx.ModelProto:
    return convert_to_packed(fixture_path(encoder), batch_size=BATCH, seq_len=SEQ)


@functools.cache
def _sessions(encoder: str) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The converted model's session and the original export's."""
    return make_session(_packed(encoder).SerializeToString()), make_session(fixture_path(encoder))


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _samples(rng: np.random.Generator, lengths: Sequence[int]) -> list[Sample]:
    # Token 0 is ModernBERT's pad id; samples never contain it.
    return [
        Sample(
            input_ids=rng.integers(1, VOCAB, size=n, dtype=np.int32),
            token_type_ids=np.zeros(n, dtype=np.int32),
        )
        for n in lengths
    ]


def _batches(samples: Sequence[Sample]) -> Iterator[list[Sample]]:
    """Consecutive runs of ``samples`` that first-fit into one ``[BATCH, SEQ]`` batch."""
    batch: list[Sample] = []
    for sample in samples:
        try:
            pack([*batch, sample], BATCH, SEQ)
        except ValueError:
            yield batch
            batch = []
        batch.append(sample)
    yield batch


def _packed_diff(
    encoder: str, samples: Sequence[Sample], *, binary_mask: bool = False
) -> tuple[float, set[int]]:
    """Max |packed - alone| over ``samples``, and how many samples shared a row with another."""
    session, original = _sessions(encoder)
    inputs = {i.name for i in session.get_inputs()}
    worst, shared = 0.0, set()
    for batch in _batches(samples):
        feeds, placements = pack(batch, BATCH, SEQ)
        if binary_mask:  # the block-diagonal bias removed: one segment per row
            feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
        outputs = run(session, {name: feeds[name] for name in inputs})
        references: list[dict[str, FloatArray]] = [run_alone(original, s) for s in batch]
        worst = max(worst, per_sample_max_diff(outputs, placements, references))
        rows = [p.row for p in placements]
        shared |= {p.length for p in placements if rows.count(p.row) > 1}
    return worst, shared


def _every_length() -> list[int]:
    """1 .. SEQ, ordered so that rows fill: SEQ, then pairs summing to SEQ."""
    order = [SEQ]
    for n in range(1, SEQ // 2 + 1):
        order += [SEQ - n, n] if SEQ - n != n else [n]
    return order


def test_position_kind_is_stated(encoder: str) -> None:
    kind, stated = ENCODERS[encoder]
    packed = _packed(encoder)
    props = {p.key: p.value for p in packed.metadata_props}
    assert props["packrunner.positions"] == f"kind={kind};offset=0"
    assert f"positions: {stated}" in explain(packed)
    assert "self-check: packed vs each sample alone" in explain(packed)
    assert "position_ids" in [i.name for i in packed.graph.input]  # the runner feeds it
    readers = [n for n in packed.graph.node if "position_ids" in n.input]
    if kind in ("relative", "rotary"):  # positions kept as exported: nothing reads the input
        assert not readers
    else:  # the absolute table summed into the embeddings reads it
        assert readers


def test_modernbert_band_is_kept() -> None:
    for encoder in MODERNBERT:
        assert "kept: a band of its own (sliding window) in the mask of 1 of 2" in explain(
            _packed(encoder)
        )


def test_packed_equals_per_sample_every_length(
    encoder: str, request: pytest.FixtureRequest
) -> None:
    lengths = _every_length()
    assert sorted(lengths) == list(range(1, SEQ + 1))
    samples = _samples(np.random.default_rng(11), lengths)
    diff, shared = _packed_diff(encoder, samples)
    # Every length shared a row with another, but SEQ and SEQ / 2 (no partner left for them).
    assert shared >= set(range(1, SEQ)) - {SEQ // 2}
    record_diff(request, diff)
    assert diff <= TOLERANCE


@pytest.mark.parametrize("encoder", [DEBERTA[0], MODERNBERT[0]])
@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, SEQ), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_packed_equals_per_sample_property(encoder: str, lengths: list[int], seed: int) -> None:
    diff, _ = _packed_diff(encoder, _samples(np.random.default_rng(seed), lengths))
    assert diff <= TOLERANCE


def test_negative_control_without_block_diagonal_bias(encoder: str) -> None:
    # The same rows with every token in one segment: samples attend to their neighbours.
    samples = _samples(np.random.default_rng(12), _every_length())
    diff, _ = _packed_diff(encoder, samples, binary_mask=True)
    assert diff > 0.1


@pytest.mark.parametrize("encoder", MODERNBERT)
def test_self_check_refuses_a_dropped_band(encoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The block-diagonal bias in place of ModernBERT's sliding-window mask, band not added back:
    # its local layers would attend across the whole sample. Refused.
    monkeypatch.setattr(converter_module, "add_mask_structure", lambda *a, **k: None)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path(encoder), batch_size=2, seq_len=SEQ)


@pytest.mark.parametrize("encoder", DEBERTA)
def test_self_check_refuses_segment_ids_as_token_mask(
    encoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DeBERTa multiplies its embeddings by the mask; left reading segment ids 1, 2, 3 it would
    # scale every sample after the first. Refused by name, and by the self-check.
    monkeypatch.setattr(converter_module, "binary_mask_reads", lambda *a, **k: set())
    with pytest.raises(ConversionError, match="attention_mask still feeds"):
        convert_to_packed(fixture_path(encoder), batch_size=2, seq_len=SEQ)
    monkeypatch.setattr(converter_module, "require_mask_replaced", lambda *a, **k: None)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path(encoder), batch_size=2, seq_len=SEQ)


def test_deberta_v2_convolution_is_refused() -> None:
    # DeBERTa-v2-xlarge's convolution over the sequence reads the neighbouring sample's tokens
    # at every segment boundary: no mask rewrite makes that packable; the self-check refuses it.
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path("tiny_hf_debertav2_conv"), batch_size=2, seq_len=SEQ)


def test_mpnet_relative_buckets_are_stated() -> None:
    # MPNet has both: an absolute table (rewritten) and a relative bucket bias (kept).
    stated = explain(convert_to_packed(fixture_path("tiny_hf_mpnet"), batch_size=2, seq_len=32))
    assert "positions: padding_offset lookup" in stated
    assert "positions: relative buckets (row-invariant): 1 gather whose" in stated


def test_unpack_repack_is_refused(encoder: str) -> None:
    with pytest.raises(ConversionError, match=UNPACK_REFUSED[encoder]):
        convert_to_packed(
            fixture_path(encoder), form="unpack_repack", batch_size=BATCH, seq_len=SEQ
        )


@pytest.mark.parametrize("encoder", [DEBERTA[0], MODERNBERT[0]])
def test_engine_runs_converted_model(tmp_path: Path, encoder: str) -> None:
    # Under packrunner's own engine: the runner feeds position_ids (read by nothing here) and
    # segment ids; every result equals the original on that sample alone.
    model_path = tmp_path / "packed.onnx"
    convert_file(fixture_path(encoder), model_path, batch_size=BATCH, seq_len=SEQ)
    rng = np.random.default_rng(13)
    samples = _samples(rng, [SEQ, 1, SEQ - 1, *(int(n) for n in rng.integers(1, SEQ + 1, 17))])
    config = RunnerConfig(
        algorithm=PackAlgorithm.FIRST_FIT, batch_size=BATCH, seq_len=SEQ, timeout_us=2_000
    )
    with PackRunner(OnnxDevice(model_path, intra_op_num_threads=2), config) as runner:
        futures = [runner.submit({"input_ids": s.input_ids}) for s in samples]
        results = [future.result(timeout=60) for future in futures]
    _, original = _sessions(encoder)
    for sample, result in zip(samples, results, strict=True):
        reference = run_alone(original, sample)["last_hidden_state"][0]
        np.testing.assert_allclose(result["last_hidden_state"], reference, rtol=0, atol=TOLERANCE)


def _sinusoid_model(combine: str) -> onnx.ModelProto:
    """Word embeddings combined (``Add`` or ``Mul``) with ``sin(position * frequency)``."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "words"),
        numpy_helper.from_array(np.array([1.0, 0.1, 0.01, 0.001], np.float32), "frequency"),
        *(
            numpy_helper.from_array(np.array(v, dtype=np.int64), n)
            for n, v in (("zero", 0), ("one", 1), ("axis0", [0]), ("axis2", [2]))
        ),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Range", ["zero", "length", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "axis0"], ["pos2d"]),
        helper.make_node("Cast", ["pos2d"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "axis2"], ["pos3d"]),
        helper.make_node("Mul", ["pos3d", "frequency"], ["angles"]),
        helper.make_node("Sin", ["angles"], ["sinusoid"]),
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node(combine, ["w", "sinusoid"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sinusoid_summed_into_embeddings_is_not_rotary() -> None:
    # Rotating by the angles (Mul) is row-invariant in attention; adding them to the embeddings
    # is an absolute position encoding, which a packed row would shift: never taken for rotary.
    for combine, found in (("Mul", PositionKind.ROTARY), ("Add", None)):
        model = _sinusoid_model(combine)
        view = GraphView(model.graph)
        invariant = find_row_invariant_positions(model, view, find_embedding_sum(view))
        assert (invariant and invariant.kind) == found
    with pytest.raises(ConversionError, match="no position-embedding lookup found"):
        convert_to_packed(_sinusoid_model("Add"), form="padded", batch_size=2, seq_len=8)
