"""RoBERTa-family checkpoints (``config.json`` + ``model.safetensors``) built without torch.

A tiny random ``RobertaModel`` / ``XLMRobertaModel`` is saved the way Hugging Face saves it
(torch and transformers only make the checkpoint), loaded by :func:`load_hf_checkpoint`, built
packed by the ``onnx.helper`` builder and run several samples to a row; every sample must equal
transformers' own forward on that sample alone (which computes positions as
``cumsum(input_ids != pad) + padding_idx``). The negative control builds the same weights with
BERT's positions (offset 0).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import (
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from packrunner.models import build_bert_onnx, load_hf_checkpoint, reference_forward

SEQ, BATCH = 48, 3
PAD = 1


@pytest.fixture(scope="module", params=["roberta", "xlm-roberta"])
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, PreTrainedModel]:
    sizes: dict[str, Any] = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": SEQ + PAD + 1,
        "pad_token_id": PAD,
    }
    torch.manual_seed(3)
    model: PreTrainedModel = (
        RobertaModel(RobertaConfig(**sizes), add_pooling_layer=False)
        if request.param == "roberta"
        else XLMRobertaModel(XLMRobertaConfig(**sizes), add_pooling_layer=False)
    )
    with torch.no_grad():  # spread weights so that wrong positions move outputs a lot
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape))
    folder = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder, model


def _torch_alone(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids[None, :].astype(np.int64)))
    result: np.ndarray = out.last_hidden_state[0].numpy()
    return result


def _packed_outputs(
    checkpoint: tuple[Path, PreTrainedModel], position_offset: int | None
) -> tuple[float, list[int]]:
    folder, torch_model = checkpoint
    config, weights = load_hf_checkpoint(folder)
    if position_offset is not None:
        config = dataclasses.replace(config, position_offset=position_offset)
    model = build_bert_onnx(
        config, weights, form="packed", batch_size=BATCH, seq_len=SEQ, head="encoder"
    )
    rng = np.random.default_rng(4)
    lengths = [SEQ, 1, SEQ - 1, 2, 17, 9, 13, 5]
    samples = [rng.integers(PAD + 1, 100, size=n) for n in lengths]
    feeds = {
        n: np.zeros((BATCH, SEQ), np.int32)
        for n in ("input_ids", "token_type_ids", "position_ids", "attention_mask")
    }
    fill, segments, places = [0] * BATCH, [0] * BATCH, []
    for ids in samples:
        row = next(r for r in range(BATCH) if fill[r] + len(ids) <= SEQ)
        start = fill[row]
        segments[row] += 1
        feeds["input_ids"][row, start : start + len(ids)] = ids
        feeds["position_ids"][row, start : start + len(ids)] = np.arange(len(ids))
        feeds["attention_mask"][row, start : start + len(ids)] = segments[row]
        fill[row] += len(ids)
        places.append((row, start))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], feeds)
    worst = 0.0
    for ids, (row, start) in zip(samples, places, strict=True):
        want = _torch_alone(torch_model, ids)
        got = hidden[row, start : start + len(ids)]
        worst = max(worst, float(np.abs(got - want).max()))
        # The numpy reference reads the same table rows as the graph.
        ref = reference_forward(config, weights, ids)["last_hidden_state"]
        worst = max(worst, float(np.abs(ref - want).max()))
    return worst, lengths


def test_roberta_checkpoint_offset_from_config(checkpoint: tuple[Path, PreTrainedModel]) -> None:
    config, _ = load_hf_checkpoint(checkpoint[0])
    assert config.position_offset == PAD + 1
    assert config.max_length == SEQ


def test_roberta_checkpoint_packed_equals_transformers(
    checkpoint: tuple[Path, PreTrainedModel],
) -> None:
    worst, lengths = _packed_outputs(checkpoint, None)
    assert {1, SEQ} <= set(lengths)
    assert worst <= 1e-4


def test_roberta_checkpoint_negative_control_bert_positions(
    checkpoint: tuple[Path, PreTrainedModel],
) -> None:
    worst, _ = _packed_outputs(checkpoint, 0)
    assert worst > 0.1
