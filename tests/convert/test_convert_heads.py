"""Per-sequence heads in packed rows: classifiers, rerankers and pooled embedders.

The fixtures (``tests/fixtures/make_tiny_hf_heads.py``, plus ``tiny_hf_xlmr_cls`` and
``tiny_hf_bert_base_sdpa`` of the other scripts) have one output row per sample. Each is
converted to the packed and the unpack/repack form, run under the engine (PackRunner +
OnnxDevice, the device reading the layouts the converter declared) on samples of every length
``1 .. SEQ``, and every sample's result is compared with the *unconverted* export run on that
sample alone. Per architecture, a deliberately wrong segment membership must be refused by the
converter's self-check, and the comparison must tell neighbouring samples apart.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from packrunner import InputForm, OutputLayout, PackRunner, RunnerConfig
from packrunner.config import PackAlgorithm
from packrunner.convert import ConversionError, convert_file, convert_to_packed, explain
from packrunner.convert import _converter as converter_module
from packrunner.convert import _pooling as pooling_module
from packrunner.convert._match_pooling import Pooling, PoolingKind
from packrunner.devices.onnx import LAYOUTS_METADATA_KEY, OnnxDevice
from packrunner.errors import ConfigError
from packrunner.graphs import NodeEmitter
from tests._support import Sample

from ._support import fixture_path, make_session, record_diff, run_single

# fixture -> (pooling found, the per-sample output)
HEADS = {
    "tiny_hf_bert_cls3_sdpa": ("first_token", "logits"),
    "tiny_hf_bert_cls3_dynamo": ("first_token", "logits"),
    "tiny_hf_bert_cls1_eager": ("first_token", "logits"),
    "tiny_hf_xlmr_cls": ("first_token", "logits"),
    "tiny_hf_xlmr_cls_sdpa": ("first_token", "logits"),
    "tiny_hf_xlmr_cls_dynamo": ("first_token", "logits"),
    "tiny_hf_distilbert_cls_sdpa": ("first_token", "logits"),
    "tiny_hf_distilbert_cls_dynamo": ("first_token", "logits"),
    "tiny_hf_bert_base_sdpa": ("first_token", "pooler_output"),
    "tiny_hf_bert_mean_sdpa": ("mean", "sentence_embedding"),
    "tiny_hf_bert_mean_dynamo": ("mean", "sentence_embedding"),
}
VOCAB = 128
# XLM-R's pad token; samples never contain it (tokenizers put it only past the end).
PAD = 1
TOLERANCE = 1e-5
BATCH, SEQ, MAX_VALID = 4, 64, 24
FORMS = {InputForm.PACKED: PackAlgorithm.FIRST_FIT, InputForm.UNPACK_REPACK: PackAlgorithm.STREAM}

Outputs = Mapping[str, npt.NDArray[np.float32]]


def _samples(rng: np.random.Generator, lengths: Sequence[int]) -> list[Sample]:
    return [
        Sample(
            input_ids=rng.integers(PAD + 1, VOCAB, size=n, dtype=np.int32),
            token_type_ids=rng.integers(0, 2, size=n, dtype=np.int32),
        )
        for n in lengths
    ]


def _run_through_runner(
    model_path: Path, form: InputForm, samples: Sequence[Sample]
) -> list[dict[str, npt.NDArray[np.float32]]]:
    device = OnnxDevice(model_path, intra_op_num_threads=2)
    config = RunnerConfig(
        algorithm=FORMS[form],
        batch_size=BATCH,
        seq_len=SEQ,
        max_valid_num=MAX_VALID,
        timeout_us=2_000,
    )
    fed = set(device.input_specs)
    with PackRunner(device, config) as runner:
        futures = [
            runner.submit(
                {
                    name: values
                    for name, values in (
                        ("input_ids", s.input_ids),
                        ("token_type_ids", s.token_type_ids),
                    )
                    if name in fed
                }
            )
            for s in samples
        ]
        return [future.result(timeout=120) for future in futures]


def _max_diff(results: Sequence[Outputs], references: Sequence[Outputs]) -> float:
    worst = 0.0
    for result, reference in zip(results, references, strict=True):
        for name, got in result.items():
            want = reference[name][0]  # the sample alone: its own length
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    return worst


@pytest.fixture(scope="module", params=sorted(HEADS))
def head(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def every_length() -> list[Sample]:
    rng = np.random.default_rng(31)
    return _samples(rng, [*range(1, SEQ + 1), *(int(n) for n in rng.integers(1, 9, size=40))])


@pytest.fixture(scope="module")
def references(head: str, every_length: list[Sample]) -> list[Outputs]:
    original = make_session(fixture_path(head))
    return [run_single(original, s) for s in every_length]


@pytest.fixture(scope="module")
def converted(head: str, tmp_path_factory: pytest.TempPathFactory) -> dict[InputForm, Path]:
    out = tmp_path_factory.mktemp(head)
    paths = {}
    for form in FORMS:
        paths[form] = out / f"{form.value}.onnx"
        convert_file(
            fixture_path(head),
            paths[form],
            form=form,
            batch_size=BATCH,
            seq_len=SEQ,
            max_valid_num=MAX_VALID,
        )
    return paths


def test_pooling_is_stated_and_layouts_declared(
    head: str, converted: dict[InputForm, Path]
) -> None:
    kind, output = HEADS[head]
    for form, layout in (
        (InputForm.PACKED, OutputLayout.SEGMENTS),
        (InputForm.UNPACK_REPACK, OutputLayout.SAMPLES),
    ):
        model = onnx.load(str(converted[form]))
        assert f"pooling: {kind} of " in explain(model)
        props = {p.key: p.value for p in model.metadata_props}
        assert f"{output}={layout.value}" in props[LAYOUTS_METADATA_KEY].split(";")
        spec = OnnxDevice(converted[form]).output_specs[output]
        assert spec.layout is layout
        shape = [d.dim_value for d in model.graph.output[-1].type.tensor_type.shape.dim]
        lead = [BATCH, SEQ] if form is InputForm.PACKED else [MAX_VALID]
        assert shape[: len(lead)] == lead


@pytest.mark.parametrize("form", list(FORMS))
def test_runner_results_equal_each_sample_alone(
    head: str,
    form: InputForm,
    converted: dict[InputForm, Path],
    every_length: list[Sample],
    references: list[Outputs],
    request: pytest.FixtureRequest,
) -> None:
    results = _run_through_runner(converted[form], form, every_length)
    output = HEADS[head][1]
    assert all(r[output].shape == references[0][output].shape[1:] for r in results)
    diff = _max_diff(results, references)
    record_diff(request, diff)
    assert diff <= TOLERANCE
    # The comparison bites: every sample's head output differs from its neighbour's reference.
    shifted = [{output: r[output]} for r in results[1:]]
    assert _max_diff(shifted, references[:-1]) > 1e-3


def test_self_check_refuses_a_wrong_segment(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Segment k read from the tokens of segment id k + 2 (the next sample of the row): refused.
    def next_segment(emit: NodeEmitter, segment_ids: str, *, max_segments: int) -> str:
        k = max_segments
        row_ids = emit.with_axes("Unsqueeze", segment_ids, [1])
        numbers = emit.const(np.arange(2, k + 2).reshape(1, k, 1), np.int32)
        return emit.op("Equal", [row_ids, numbers])

    monkeypatch.setattr(pooling_module, "segment_membership", next_segment)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(fixture_path(head), batch_size=2, seq_len=16)


def test_self_check_refuses_a_wrong_slot_pooling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unpack/repack: each slot's mean where the head reads its first token: refused.
    rewrite = pooling_module.pool_per_slot

    def swapped(view: object, poolings: Sequence[Pooling], *args: object, **kwargs: object) -> None:
        wrong = [dataclasses.replace(p, kind=PoolingKind.MEAN) for p in poolings]
        rewrite(view, wrong, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(converter_module, "pool_per_slot", swapped)
    with pytest.raises(ConversionError, match="does not reproduce the export"):
        convert_to_packed(
            fixture_path("tiny_hf_xlmr_cls"), form="unpack_repack", batch_size=2, seq_len=16
        )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lengths=st.lists(st.integers(1, SEQ), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
    form=st.sampled_from(list(FORMS)),
)
def test_property_any_lengths(
    tmp_path_factory: pytest.TempPathFactory, lengths: list[int], seed: int, form: InputForm
) -> None:
    path = _shared_conversion(tmp_path_factory, "tiny_hf_bert_mean_sdpa", form)
    samples = _samples(np.random.default_rng(seed), lengths)
    original = make_session(fixture_path("tiny_hf_bert_mean_sdpa"))
    results = _run_through_runner(path, form, samples)
    assert _max_diff(results, [run_single(original, s) for s in samples]) <= TOLERANCE


_CONVERSIONS: dict[tuple[str, InputForm], Path] = {}


def _shared_conversion(factory: pytest.TempPathFactory, name: str, form: InputForm) -> Path:
    key = (name, form)
    if key not in _CONVERSIONS:
        path = factory.mktemp("property") / f"{form.value}.onnx"
        convert_file(
            fixture_path(name),
            path,
            form=form,
            batch_size=BATCH,
            seq_len=SEQ,
            max_valid_num=MAX_VALID,
        )
        _CONVERSIONS[key] = path
    return _CONVERSIONS[key]


def _pool_second_token(name: str) -> onnx.ModelProto:
    """The fixture with its head reading token 1 instead of token 0: no pooling we rewrite."""
    model = onnx.load(str(fixture_path(name)))
    (gather,) = [n for n in model.graph.node if n.output[0] == "/model/bert/pooler/Gather_output_0"]
    index = "packrunner_test/second_token"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), index))
    gather.input[1] = index
    return model


def test_other_pooling_is_refused_with_the_reason() -> None:
    with pytest.raises(ConversionError, match="no per-token output, and .* neither the first"):
        convert_to_packed(_pool_second_token("tiny_hf_bert_cls3_sdpa"), batch_size=2, seq_len=16)


def test_row_outputs_kept_per_row_on_request() -> None:
    model = convert_to_packed(
        fixture_path("tiny_hf_bert_cls3_sdpa"), batch_size=2, seq_len=16, keep_row_outputs=True
    )
    props = {p.key: p.value for p in model.metadata_props}
    assert props[LAYOUTS_METADATA_KEY] == "logits=rows"
    assert "pooling:" not in explain(model)


def test_declared_layouts_are_checked(tmp_path: Path) -> None:
    model = convert_to_packed(fixture_path("tiny_hf_bert_cls3_sdpa"), batch_size=2, seq_len=16)
    path = tmp_path / "m.onnx"
    # An explicit layout wins over the declared one ...
    onnx.save(model, str(path))
    device = OnnxDevice(path, output_layouts={"logits": OutputLayout.PACKED_TOKENS})
    assert device.output_specs["logits"].layout is OutputLayout.PACKED_TOKENS
    # ... and a declaration that names no layout is refused.
    onnx.helper.set_model_props(model, {LAYOUTS_METADATA_KEY: "logits=per_row"})
    onnx.save(model, str(path))
    with pytest.raises(ConfigError, match="declares 'logits=per_row'"):
        OnnxDevice(path)


def test_cli_explain_states_the_pooling(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "packrunner.cli",
            "convert",
            str(fixture_path("tiny_hf_xlmr_cls")),
            str(tmp_path / "reranker.onnx"),
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
    assert "pooling: first_token of " in result.stdout
    assert "then Gemm -> Tanh -> Gemm -> ['logits']" in result.stdout
    assert "rewrote: 1 pooling(s) per segment" in result.stdout
