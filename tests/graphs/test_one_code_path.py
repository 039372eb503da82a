"""The model builder and the converter share one attention-bias and one stream-index code path.

The same BERT is built packed by :func:`build_bert_onnx` and converted to packed by
:func:`convert_to_packed` from the builder's padded twin. Both must compute exactly the same thing
for samples of every length ``1..seq_len``, equal to each sample run alone through the padded
model; the nodes that read only ``attention_mask`` (``unpack_info``) must be exactly (at least)
what :mod:`packrunner.graphs` emits for the bias (stream index). Negative controls show the checks
bite: the converter's padded form fed the same packed batches, and an unpack_info that merges two
samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from packrunner import InputForm
from packrunner.convert import convert_to_packed
from packrunner.graphs import (
    GraphView,
    NodeEmitter,
    StreamIndex,
    block_diagonal_bias,
    padding_bias,
)
from packrunner.models import BertConfig, build_bert_onnx, random_bert_weights
from tests._support import Sample, pack_padded, pack_rows, pack_stream, token_samples
from tests.convert._support import fixture_path
from tests.models._support import TOLERANCE, OrtModel, max_abs_diff

CONFIG = BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=32,
    max_position_embeddings=32,
    type_vocab_size=2,
)
BATCH, SEQ, SLOTS = 4, 16, 12


@pytest.fixture(scope="module")
def built() -> dict[InputForm, onnx.ModelProto]:
    weights = random_bert_weights(CONFIG, seed=3)
    return {
        form: build_bert_onnx(
            CONFIG, weights, form=form, batch_size=BATCH, seq_len=SEQ, max_valid_num=SLOTS
        )
        for form in InputForm
    }


def _convert(model: onnx.ModelProto | Path, form: InputForm) -> onnx.ModelProto:
    return convert_to_packed(model, form=form, batch_size=BATCH, seq_len=SEQ, max_valid_num=SLOTS)


@pytest.fixture(scope="module")
def converted(built: dict[InputForm, onnx.ModelProto]) -> dict[InputForm, onnx.ModelProto]:
    padded = built[InputForm.PADDED]
    forms = (InputForm.PACKED, InputForm.PADDED)
    return {form: _convert(padded, form) for form in forms}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """One sample of every length 1..SEQ, in a shuffled order."""
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.permutation(np.arange(1, SEQ + 1))]
    return token_samples(rng, lengths, CONFIG.vocab_size, pairs=True)


@pytest.fixture(scope="module")
def alone(
    built: dict[InputForm, onnx.ModelProto], samples: list[Sample]
) -> list[dict[str, np.ndarray]]:
    """Each sample run alone (row 0 of a padded batch), cut to its length."""
    padded = OrtModel(built[InputForm.PADDED])
    results = []
    for sample in samples:
        out = padded(pack_padded([sample], BATCH, SEQ))
        results.append({name: value[0, : sample.length] for name, value in out.items()})
    return results


def _row_batches(samples: list[Sample]) -> Iterator[list[list[int]]]:
    """First-fit the samples (by index) into rows of SEQ tokens, BATCH rows per batch."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for index, sample in enumerate(samples):
        row = next((r for r, used in enumerate(fill) if used + sample.length <= SEQ), None)
        if row is None:
            if len(rows) == BATCH:
                yield rows
                rows, fill = [], []
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(index)
        fill[row] += sample.length
    yield rows


def _run_packed(
    model: OrtModel, samples: list[Sample], *, zero_one_mask: bool = False
) -> list[dict[str, np.ndarray]]:
    """Each sample's outputs from packed batches of ``model``, in sample order."""
    results: dict[int, dict[str, np.ndarray]] = {}
    for rows in _row_batches(samples):
        feeds, placements = pack_rows([[samples[i] for i in row] for row in rows], BATCH, SEQ)
        if zero_one_mask:
            feeds["attention_mask"] = (feeds["attention_mask"] > 0).astype(np.int32)
        out = model({name: feeds[name] for name in model.input_names})
        order = [i for row in rows for i in row]
        for index, place in zip(order, placements, strict=True):
            end = place.offset + samples[index].length
            results[index] = {name: v[place.row, place.offset : end] for name, v in out.items()}
    assert len(results) == len(samples)
    return [results[i] for i in range(len(samples))]


def _worst(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> float:
    return max(max_abs_diff(g[name], w[name]) for g, w in zip(got, want, strict=True) for name in w)


def test_builder_and_converter_compute_the_same_packed_model(
    built: dict[InputForm, onnx.ModelProto],
    converted: dict[InputForm, onnx.ModelProto],
    samples: list[Sample],
    alone: list[dict[str, np.ndarray]],
) -> None:
    from_builder = _run_packed(OrtModel(built[InputForm.PACKED]), samples)
    from_converter = _run_packed(OrtModel(converted[InputForm.PACKED]), samples)
    assert _worst(from_builder, from_converter) <= 1e-6  # measured: 0.0, the same graph
    assert _worst(from_converter, alone) <= TOLERANCE
    # Negative control: the same packed batches through the padded form (0/1 mask kept), where
    # the samples of a row see each other.
    leaky = _run_packed(OrtModel(converted[InputForm.PADDED]), samples, zero_one_mask=True)
    assert _worst(leaky, alone) > 100 * TOLERANCE  # the equality check above would fail


def _stream_batches(samples: list[Sample]) -> Iterator[list[Sample]]:
    """Consecutive samples laid back to back, as many per batch as tokens and slots allow."""
    batch: list[Sample] = []
    for sample in samples:
        if len(batch) == SLOTS or sum(s.length for s in batch) + sample.length > BATCH * SEQ:
            yield batch
            batch = []
        batch.append(sample)
    yield batch


def test_builder_stream_model_equals_samples_alone(
    built: dict[InputForm, onnx.ModelProto],
    samples: list[Sample],
    alone: list[dict[str, np.ndarray]],
) -> None:
    model = OrtModel(built[InputForm.UNPACK_REPACK])
    got: list[dict[str, np.ndarray]] = []
    for batch in _stream_batches(samples):
        out = model(pack_stream(batch, BATCH, SEQ, SLOTS)[0])
        got.extend(
            {name: v[slot, : s.length] for name, v in out.items()} for slot, s in enumerate(batch)
        )
    assert _worst(got, alone) <= TOLERANCE
    # Negative control: unpack_info that reads two samples as one.
    feeds, _ = pack_stream(samples[:2], BATCH, SEQ, SLOTS)
    feeds["unpack_info"][:2] = [samples[0].length + samples[1].length, 0]
    merged = model(feeds)["start_logits"][0, : samples[0].length]
    assert max_abs_diff(merged, alone[0]["start_logits"]) > 100 * TOLERANCE


def _ops_reading_only(model: onnx.ModelProto, name: str) -> Counter[str]:
    """Op types of the nodes whose value depends on graph input ``name`` and nothing else."""
    view = GraphView(model.graph)
    only = frozenset({name})
    return Counter(n.op_type for n in model.graph.node if view.value_deps(n.output[0]) == only)


def _emitted(name: str, shape: list[int], what: str) -> onnx.ModelProto:
    """A graph holding only what packrunner.graphs emits from input ``name`` for ``what``."""
    graph = helper.make_graph(
        [], "g", [helper.make_tensor_value_info(name, TensorProto.INT32, shape)], []
    )
    emit = NodeEmitter(GraphView(graph), opset=17)
    if what == "block_diagonal":
        block_diagonal_bias(emit, name)
    elif what == "padding":
        padding_bias(emit, name, batch_size=BATCH, seq_len=SEQ)
    else:
        stream = StreamIndex(emit, name, batch_size=BATCH, seq_len=SEQ, max_valid_num=SLOTS)
        stream.attention_bias()
    graph.node.extend(emit.nodes)
    return helper.make_model(graph)


def test_one_mask_bias_per_form(
    built: dict[InputForm, onnx.ModelProto], converted: dict[InputForm, onnx.ModelProto]
) -> None:
    def canonical(what: str) -> Counter[str]:
        return _ops_reading_only(_emitted("attention_mask", [BATCH, SEQ], what), "attention_mask")

    block, padding = canonical("block_diagonal"), canonical("padding")
    assert block and padding and block != padding  # distinct subgraphs, so the check can tell
    assert _ops_reading_only(built[InputForm.PACKED], "attention_mask") == block
    assert _ops_reading_only(converted[InputForm.PACKED], "attention_mask") == block
    assert _ops_reading_only(built[InputForm.PADDED], "attention_mask") == padding
    # The converter's padded form keeps the export's mask: here the builder's padding bias.
    assert _ops_reading_only(converted[InputForm.PADDED], "attention_mask") == padding


def test_one_stream_index(built: dict[InputForm, onnx.ModelProto]) -> None:
    canonical = _ops_reading_only(_emitted("unpack_info", [SLOTS], "stream"), "unpack_info")
    converted_stream = _convert(fixture_path("tiny_hf_bert_qa"), InputForm.UNPACK_REPACK)
    for model in (built[InputForm.UNPACK_REPACK], converted_stream):
        found = _ops_reading_only(model, "unpack_info")
        # The stream index and slot bias, once; beyond them only reshapes of the valid mask for
        # zeroing outputs past each sample's length.
        assert found - canonical <= Counter({"Reshape": 2}), found - canonical
        assert canonical - found == Counter()
