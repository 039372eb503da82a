"""TEI ``/rerank`` and ``/predict`` over plain HTTP, serving converted per-sequence heads.

``packrunner convert`` turns tiny random BERT sequence classifiers (a 1-label cross-encoder and a
3-label classifier, ``tests/fixtures/make_tiny_hf_heads.py``) into packed models whose logits are
per segment; ``packrunner serve`` loads the converted file (``--model``, ``--tokenizer``) and the
device reads the layouts the converter declared. Every score must equal the unconverted export
run on that (query, text) pair alone, with TEI's activation (sigmoid for one label, softmax else).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from packrunner.convert import convert_file
from packrunner.serve.model import load_model
from packrunner.serve.tokenizer import build_default_tokenizer
from tests._support import Sample
from tests.convert._support import fixture_path, make_session, run_single

from ._support import ServerThread, settings

QUERY = "what does packing do"
TEXTS = ["it puts several sequences in one row", "cats", "the runner packs rows", "x y z"]
# The fixtures' vocabulary: the generated WordPiece tokenizer is built to exactly this size.
VOCAB = 128


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    build_default_tokenizer(VOCAB).save(str(path))
    return path


def _serve(fixture: str, folder: Path, tokenizer: Path) -> ServerThread:
    model_path = folder / f"{fixture}.onnx"
    convert_file(fixture_path(fixture), model_path, batch_size=4, seq_len=64)
    config = settings(model=str(model_path), tokenizer=str(tokenizer), batch_timeout_us=2_000)
    return ServerThread(config, load_model(config))


def _alone(fixture: str, texts: list[str]) -> list[np.ndarray]:
    """The unconverted export's logits for each (QUERY, text) pair, run alone."""
    original = make_session(fixture_path(fixture))
    tokenizer = build_default_tokenizer(VOCAB)
    logits = []
    for text in texts:
        encoding = tokenizer.encode(QUERY, text)
        sample = Sample(np.array(encoding.ids, np.int32), np.array(encoding.type_ids, np.int32))
        logits.append(run_single(original, sample)["logits"][0])
    return logits


def test_rerank_scores_equal_each_pair_alone(tmp_path: Path, tokenizer_file: Path) -> None:
    with (
        _serve("tiny_hf_bert_cls1_eager", tmp_path, tokenizer_file) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as http,
    ):
        ranked = http.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        raw = http.post(
            "/rerank",
            json={"query": QUERY, "texts": TEXTS, "raw_scores": True, "return_text": True},
        )
        empty = http.post("/rerank", json={"query": QUERY, "texts": []})
        predict = http.post("/predict", json={"inputs": [QUERY, TEXTS[0]]})
        info = http.get("/info").json()
    assert ranked.status_code == 200, ranked.text
    logits = np.array([float(v[0]) for v in _alone("tiny_hf_bert_cls1_eager", TEXTS)])
    expected = 1.0 / (1.0 + np.exp(-logits))
    answer = ranked.json()
    assert [a["index"] for a in answer] == sorted(range(len(TEXTS)), key=lambda i: -expected[i])
    assert all("text" not in a for a in answer)
    got = np.array([a["score"] for a in sorted(answer, key=lambda a: a["index"])])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # The scores tell the texts apart (a check that cannot pass on one repeated value).
    assert np.ptp(got) > 1e-3
    by_index = {a["index"]: a for a in raw.json()}
    np.testing.assert_allclose(
        [by_index[i]["score"] for i in range(len(TEXTS))], logits, rtol=0, atol=1e-5
    )
    assert [by_index[i]["text"] for i in range(len(TEXTS))] == TEXTS
    assert empty.status_code == 400 and empty.json()["error_type"] == "empty"
    # /predict on the same cross-encoder: one label, TEI's sigmoid.
    assert predict.status_code == 200
    np.testing.assert_allclose(predict.json()[0]["score"], expected[0], rtol=0, atol=1e-5)
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}}}


def test_predict_on_a_converted_classifier(tmp_path: Path, tokenizer_file: Path) -> None:
    with (
        _serve("tiny_hf_bert_cls3_sdpa", tmp_path, tokenizer_file) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as http,
    ):
        batch = http.post("/predict", json={"inputs": [[QUERY, t] for t in TEXTS]})
        rerank = http.post("/rerank", json={"query": QUERY, "texts": TEXTS})
    assert batch.status_code == 200, batch.text
    for answer, logits in zip(batch.json(), _alone("tiny_hf_bert_cls3_sdpa", TEXTS), strict=True):
        shifted = np.exp(logits - logits.max())
        probabilities = shifted / shifted.sum()
        scores = {a["label"]: a["score"] for a in answer}
        got = [scores[f"LABEL_{i}"] for i in range(3)]
        np.testing.assert_allclose(got, probabilities, rtol=0, atol=1e-5)
    # Three labels are no relevance score: TEI's backend error.
    assert rerank.status_code == 424
    assert rerank.json()["error"] == "model is not a re-ranker model"
