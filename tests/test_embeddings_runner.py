"""Real weights through the runner: all-MiniLM-L6-v2 sentence embeddings, packed vs padded.

The packed encoder's per-segment mean-pooled embeddings (``[B, max_valid_num, H]``, cut back
per sample) and per-token hidden states must equal the padded model's (one sentence per row).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from packrunner import OutputLayout, PackAlgorithm, PackRunner, RunnerConfig
from packrunner.bench.accuracy import compare_results
from packrunner.devices.onnx import OnnxDevice
from packrunner.models import build_bert_onnx, load_hf_checkpoint, minilm_checkpoint_dir

BATCH, SEQ, SLOTS = 4, 64, 12
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Stocks dropped as investors worried about higher borrowing costs.",
    "How do I bake sourdough bread at home?",
    "packrunner packs several sentences into one row of a static batch.",
    "Padding each request to the full length wastes about half of the device.",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = minilm_checkpoint_dir()
    config, weights = load_hf_checkpoint(folder)
    directory = tmp_path_factory.mktemp("minilm")
    paths = {}
    for form in ("packed", "padded"):
        model = build_bert_onnx(
            config,
            weights,
            form=form,
            batch_size=BATCH,
            seq_len=SEQ,
            max_valid_num=SLOTS,
            head="encoder",
        )
        paths[form] = directory / f"{form}.onnx"
        onnx.save(model, paths[form])
    return paths


@pytest.fixture(scope="module")
def samples() -> list[dict[str, Any]]:
    tokenizer = Tokenizer.from_file(str(minilm_checkpoint_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoded = tokenizer.encode_batch(SENTENCES)
    return [
        {
            "input_ids": np.array(e.ids, dtype=np.int32),
            "token_type_ids": np.array(e.type_ids, dtype=np.int32),
        }
        for e in encoded
    ]


async def embed(path: Path, algorithm: PackAlgorithm, samples) -> list[dict[str, Any]]:
    device = OnnxDevice(path)
    config = RunnerConfig(
        batch_size=BATCH, seq_len=SEQ, max_valid_num=SLOTS, algorithm=algorithm, timeout_us=2_000
    )
    async with PackRunner(device, config) as runner:
        return await asyncio.gather(*(runner.execute_async(s) for s in samples))


async def test_packed_minilm_embeddings_equal_padded(models, samples):
    packed_device = OnnxDevice(models["packed"])
    assert packed_device.output_specs["sentence_embedding"].layout is OutputLayout.SEGMENTS
    padded_device = OnnxDevice(models["padded"])
    assert padded_device.output_specs["sentence_embedding"].layout is OutputLayout.ROWS
    padded = await embed(models["padded"], PackAlgorithm.PADDED, samples)
    packed = await embed(models["packed"], PackAlgorithm.LOOKAHEAD, samples)
    lengths = [len(s["input_ids"]) for s in samples]
    report = compare_results(padded, packed, lengths)
    assert report["last_hidden_state"].max_abs_diff <= 1e-5, report
    embeddings = compare_results(
        [{"e": r["sentence_embedding"]} for r in padded],
        [{"e": r["sentence_embedding"]} for r in packed],
    )
    assert embeddings["e"].max_abs_diff <= 1e-5
    for result, length in zip(packed, lengths, strict=True):
        assert result["last_hidden_state"].shape == (length, 384)
        assert result["sentence_embedding"].shape == (384,)

    def cosine(a: int, b: int) -> float:
        x, y = packed[a]["sentence_embedding"], packed[b]["sentence_embedding"]
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cosine(0, 1) > cosine(0, 9) + 0.3  # eating vs eating, unlike stocks
    assert cosine(9, 10) > cosine(9, 3) + 0.3  # stocks vs stocks, unlike horses
