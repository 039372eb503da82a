"""``precision="fp16"`` (``packrunner convert --precision fp16``): fp16 graphs, checked per sample.

Each fp16 conversion runs under packrunner's engine (PackRunner + OnnxDevice) on samples of
lengths ``1 .. seq_len``; every sample's outputs are compared with the *fp32 unconverted* export
run on that sample alone, within the stated fp16 tolerance
(:data:`packrunner.convert._precision.FP16_TOLERANCE` of the output magnitude). Negative controls
show that this looser tolerance still catches the mistakes the converter guards against, and that
the fp16 graph really is fp16 (the fp32 tolerance refuses it). The block-diagonal bias must stay
finite: fully masked rows and empty slots give finite outputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from packrunner import InputForm, PackRunner, RunnerConfig
from packrunner.config import PackAlgorithm
from packrunner.convert import ConversionError, Precision, convert_file, convert_to_packed, explain
from packrunner.convert import _converter as converter_module
from packrunner.convert import _precision as precision_module
from packrunner.convert._match_positions import PositionLookup, find_position_lookup
from packrunner.convert._precision import FP16_TOLERANCE, FP32_TOLERANCE, index_arithmetic
from packrunner.devices.onnx import OnnxDevice
from packrunner.graphs import MASK_BIAS
from tests._support import Sample
from tests._support import pack_first_fit as pack

from ._support import fill_lengths, fixture_path, make_session, record_diff, run, run_single

BATCH, SEQ, MAX_VALID = 4, 64, 24
VOCAB = 128
# fixture -> table row of a sample's first token (for an original fed position_ids; else unused)
FIXTURES = {
    "tiny_hf_bert_qa": 0,
    "tiny_hf_roberta_sdpa": 2,
    "tiny_hf_mpnet": 2,
    "tiny_hf_bert_attention_op23": 0,
}
# Refused in fp32 too (see test_convert_encoders and test_convert_attention_ops).
UNPACK_REFUSED = {
    "tiny_hf_mpnet": "from outside the attention block",
    "tiny_hf_bert_attention_op23": "ai.onnx::Attention ops yet",
}
FORMS = {InputForm.PACKED: PackAlgorithm.FIRST_FIT, InputForm.UNPACK_REPACK: PackAlgorithm.STREAM}


def _samples(rng: np.random.Generator, lengths: list[int]) -> list[Sample]:
    # Ids from 2: never the RoBERTa family's pad token (1).
    return [
        Sample(rng.integers(2, VOCAB, size=n, dtype=np.int32), np.zeros(n, dtype=np.int32))
        for n in lengths
    ]


def _convert(fixture: str, form: InputForm, tmp_path: Path) -> Path:
    path = tmp_path / f"{fixture}_{form}_fp16.onnx"
    convert_file(
        fixture_path(fixture),
        path,
        batch_size=BATCH,
        seq_len=SEQ,
        form=form,
        max_valid_num=MAX_VALID,
        precision="fp16",
    )
    return path


@pytest.fixture(scope="module")
def packed_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert("tiny_hf_bert_qa", InputForm.PACKED, tmp_path_factory.mktemp("fp16"))


def _worst_relative(
    results: list[dict[str, np.ndarray]], references: list[dict[str, np.ndarray]]
) -> tuple[float, float]:
    """(max abs diff, the fp16 bound): the bound is FP16_TOLERANCE of the output magnitude."""
    worst, bound = 0.0, 0.0
    for result, reference in zip(results, references, strict=True):
        for name, got in result.items():
            want = reference[name][0, : got.shape[0]]
            worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
            bound = max(bound, FP16_TOLERANCE * max(1.0, float(np.abs(want).max())))
    return worst, bound


def _run_engine(path: Path, algorithm: PackAlgorithm, samples: list[Sample], inputs: list[str]):
    config = RunnerConfig(
        algorithm=algorithm,
        batch_size=BATCH,
        seq_len=SEQ,
        max_valid_num=MAX_VALID,
        timeout_us=2_000,
        check_finite=True,
    )
    with (
        PackRunner(OnnxDevice(path, intra_op_num_threads=2), config) as runner,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        futures = [
            pool.submit(
                runner.execute,
                {name: getattr(s, name) for name in inputs},
                timeout=60,
            )
            for s in samples
        ]
        return [f.result() for f in futures]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fp16_equals_fp32_original_per_sample(
    fixture: str, form: InputForm, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if fixture in UNPACK_REFUSED and form is InputForm.UNPACK_REPACK:
        with pytest.raises(ConversionError, match=UNPACK_REFUSED[fixture]):
            _convert(fixture, form, tmp_path)
        return
    path = _convert(fixture, form, tmp_path)
    model = onnx.load(str(path))
    assert "precision: fp16" in explain(model)
    weights = [t for t in model.graph.initializer if t.data_type in (1, 10) and t.dims]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT}
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {TensorProto.INT32}

    rng = np.random.default_rng(21)
    lengths = [SEQ, 1, SEQ - 1, 2, *(int(n) for n in rng.integers(1, SEQ + 1, size=16))]
    samples = _samples(rng, lengths)
    types = {i.name for i in model.graph.input} & {"token_type_ids"}
    inputs = ["input_ids", *types]
    results = _run_engine(path, FORMS[form], samples, inputs)
    original = make_session(fixture_path(fixture))
    references = [run_single(original, s, position_offset=FIXTURES[fixture]) for s in samples]
    worst, bound = _worst_relative(results, references)
    record_diff(request, worst, f" (fp16 {form}, bound {bound:.3g})")
    assert 0 < worst <= bound  # 0 would mean the graph still computes in fp32


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(lengths=st.lists(st.integers(1, SEQ), min_size=1, max_size=12))
def test_fp16_packed_rows_property(packed_fp16: Path, lengths: list[int]) -> None:
    # Any mix of lengths packed by the reference packer: each sample as the fp32 original alone.
    room = [SEQ] * BATCH
    fitting = []
    for n in lengths:  # the ones that first-fit into one batch
        row = next((r for r in range(BATCH) if room[r] >= n), None)
        if row is not None:
            room[row] -= n
            fitting.append(n)
    rng = np.random.default_rng(len(lengths))
    samples = _samples(rng, fitting)
    feeds, placements = pack(samples, BATCH, SEQ)
    session = make_session(packed_fp16)
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    outputs = run(session, feeds)
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    results = [
        {name: out[p.row, p.offset : p.offset + p.length] for name, out in outputs.items()}
        for p in placements
    ]
    references = [run_single(original, s) for s in samples]
    worst, bound = _worst_relative(results, references)
    assert worst <= bound


def test_fp16_negative_control_row_positions(packed_fp16: Path) -> None:
    # Positions counted from the row start: wrong by far more than the fp16 tolerance.
    rng = np.random.default_rng(22)
    samples = _samples(rng, fill_lengths(rng, BATCH, SEQ))
    feeds, placements = pack(samples, BATCH, SEQ)
    feeds["position_ids"] = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()
    outputs = run(make_session(packed_fp16), feeds)
    results = [
        {name: out[p.row, p.offset : p.offset + p.length] for name, out in outputs.items()}
        for p in placements
    ]
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    worst, bound = _worst_relative(results, [run_single(original, s) for s in samples])
    assert worst > 5 * bound


def test_fp16_negative_control_padding_mask(tmp_path: Path) -> None:
    # The fp16 padded form fed packed rows: samples attend to their row neighbours.
    path = tmp_path / "padded_fp16.onnx"
    convert_file(
        fixture_path("tiny_hf_bert_qa"),
        path,
        batch_size=BATCH,
        seq_len=SEQ,
        form="padded",
        precision="fp16",
    )
    rng = np.random.default_rng(23)
    samples = _samples(rng, fill_lengths(rng, BATCH, SEQ))
    feeds, placements = pack(samples, BATCH, SEQ)
    feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
    session = make_session(path)
    outputs = run(session, {i.name: feeds[i.name] for i in session.get_inputs()})
    results = [
        {name: out[p.row, p.offset : p.offset + p.length] for name, out in outputs.items()}
        for p in placements
    ]
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    worst, bound = _worst_relative(results, [run_single(original, s) for s in samples])
    assert worst > 5 * bound


def test_mask_bias_is_exact_in_fp16() -> None:
    assert float(np.float16(MASK_BIAS)) == MASK_BIAS
    assert np.exp(np.float16(MASK_BIAS)) == 0  # masked keys contribute exactly nothing
    scores = np.full(SEQ, MASK_BIAS, np.float16) + np.float16(3.5)  # a fully masked row
    shifted = (scores - scores.max()).astype(np.float32)
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    assert np.isfinite(probabilities).all()


@pytest.mark.parametrize("form", list(FORMS))
def test_fp16_fully_masked_rows_are_finite(form: InputForm, tmp_path: Path) -> None:
    # An all-padding batch: every query of every row (packed) / every slot (unpack/repack) has no
    # key to attend to; the finite bias gives a uniform softmax, never NaN or inf.
    session = make_session(_convert("tiny_hf_bert_qa", form, tmp_path))
    feeds = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.int32)
        for i in session.get_inputs()
    }
    for output in run(session, feeds).values():
        assert np.isfinite(output).all()
    if form is InputForm.PACKED:
        # A row whose last tokens are padding: their scores are all masked as well.
        feeds["attention_mask"][:, : SEQ // 2] = 1
        feeds["position_ids"][:, : SEQ // 2] = np.arange(SEQ // 2)
        for output in run(session, feeds).values():
            assert np.isfinite(output).all()


def test_self_check_uses_the_fp16_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fp16 graph differs from the fp32 original by more than the fp32 tolerance (it is
    # really fp16), and the self-check of an fp16 conversion holds it to the fp16 one.
    model = convert_to_packed(
        fixture_path("tiny_hf_bert_qa"), batch_size=2, seq_len=16, precision=Precision.FP16
    )
    stated = explain(model).splitlines()[-1]
    diff, bound = (float(x) for x in stated.split("max abs diff ")[1].split(" <= "))
    assert FP32_TOLERANCE * 3 < diff <= bound
    monkeypatch.setattr(Precision, "tolerance", property(lambda self: FP32_TOLERANCE))
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(
            fixture_path("tiny_hf_bert_qa"), batch_size=2, seq_len=16, precision="fp16"
        )


def test_fp16_self_check_refuses_wrong_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fp16 tolerance is loose enough for fp16 rounding, not for an off-by-one position.
    found = find_position_lookup

    def off_by_one(*args: object, **kwargs: object) -> PositionLookup:
        lookup = found(*args, **kwargs)  # type: ignore[arg-type]
        assert lookup is not None  # RoBERTa has a position table
        return dataclasses.replace(lookup, offset=lookup.offset + 1)

    monkeypatch.setattr(converter_module, "find_position_lookup", off_by_one)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(
            fixture_path("tiny_hf_roberta_sdpa"), batch_size=2, seq_len=16, precision="fp16"
        )


def test_index_arithmetic_stays_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # MPNet computes its relative-position buckets in float (a log) and truncates them to ints:
    # those nodes stay fp32. Rounded to fp16, tokens land in neighbouring buckets: refused.
    source = onnx.load(str(fixture_path("tiny_hf_mpnet")))
    kept = index_arithmetic(onnx.shape_inference.infer_shapes(source))
    assert any("Log" in name for name in kept)
    assert all("layer" not in name for name in kept)  # no encoder layer is kept in fp32
    model = convert_to_packed(source, batch_size=2, seq_len=32, precision="fp16")
    elem_types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    logs = [n for n in model.graph.node if n.op_type == "Log"]
    assert logs and all(elem_types[n.output[0]] == TensorProto.FLOAT for n in logs)
    monkeypatch.setattr(precision_module, "index_arithmetic", lambda model: set())
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(source, batch_size=2, seq_len=32, precision="fp16")


def test_bad_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'fp16', got 'int8'"):
        convert_to_packed(fixture_path("tiny_hf_bert_qa"), precision="int8")


def test_cli_precision_fp16(tmp_path: Path) -> None:
    out = tmp_path / "fp16.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "packrunner.cli",
            "convert",
            str(fixture_path("tiny_hf_bert_qa")),
            str(out),
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--precision",
            "fp16",
            "--explain",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "precision=fp16" in result.stdout
    assert "precision: fp16 weights and activations" in result.stdout
    model = onnx.load(str(out))
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
