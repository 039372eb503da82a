"""OpenAI and TEI-style routes with real clients: the official openai client, plain httpx."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest

from packrunner import OutputLayout, OutputSpec, PackRunner, SimulatedDevice
from packrunner.serve.tokenizer import TextEncoder, build_default_tokenizer

from ._support import ServerThread, served, settings

MODEL = "packrunner-bert"
TEXTS = ["The cat sat on the mat.", "Packing puts several sequences in one row!", "x"]


def _in_process_embeddings(runner: PackRunner, texts: list[str]) -> list[npt.NDArray[np.float32]]:
    """Tokenise with a fresh copy of the default tokenizer, run in process, mean-pool."""
    tokenizer = build_default_tokenizer()
    ids = [np.array(e.ids, np.int64) for e in tokenizer.encode_batch(texts)]

    async def run() -> list[npt.NDArray[np.float32]]:
        results = await asyncio.gather(*(runner.execute_async({"input_ids": i}) for i in ids))
        return [r["last_hidden_state"].mean(axis=0, dtype=np.float32) for r in results]

    return asyncio.run(run())


@pytest.mark.parametrize("encoding", [None, "float"], ids=["base64-default", "float"])
def test_openai_client_embeddings_equal_in_process(
    served: ServerThread, reference_runner: PackRunner, encoding: str | None
) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    kwargs = {} if encoding is None else {"encoding_format": encoding}
    response = client.embeddings.create(model=MODEL, input=TEXTS, **kwargs)  # type: ignore[arg-type]
    expected = _in_process_embeddings(reference_runner, TEXTS)
    assert [d.index for d in response.data] == [0, 1, 2]
    for datum, vector in zip(response.data, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(datum.embedding, np.float32), vector)
    assert response.usage.prompt_tokens == sum(
        len(e.ids) for e in build_default_tokenizer().encode_batch(TEXTS)
    )
    assert response.model == MODEL


def test_openai_token_id_inputs(served: ServerThread, reference_runner: PackRunner) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    single = client.embeddings.create(model=MODEL, input=[101, 7000, 102])
    nested = client.embeddings.create(model=MODEL, input=[[101, 7000, 102], [101, 5, 6, 102]])
    assert len(single.data) == 1 and len(nested.data) == 2
    np.testing.assert_array_equal(
        np.asarray(single.data[0].embedding), np.asarray(nested.data[0].embedding)
    )
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=MODEL, input="x", dimensions=3)
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_tei_embed_normalize_and_truncate(
    served: ServerThread, reference_runner: PackRunner
) -> None:
    with httpx.Client(base_url=served.base_url) as http:
        raw = http.post("/embed", json={"inputs": TEXTS[:2], "normalize": False})
        assert raw.status_code == 200
        expected = _in_process_embeddings(reference_runner, TEXTS[:2])
        np.testing.assert_array_equal(np.asarray(raw.json(), np.float32), np.stack(expected))
        unit = http.post("/embed", json={"inputs": TEXTS[0]}).json()
        assert len(unit) == 1
        assert np.linalg.norm(unit[0]) == pytest.approx(1.0, abs=1e-6)
        long_text = " ".join(["word"] * 200)
        refused = http.post("/embed", json={"inputs": long_text})
        assert refused.status_code == 422
        assert refused.json()["error_type"] == "validation"
        truncated = http.post("/embed", json={"inputs": long_text, "truncate": True})
        assert truncated.status_code == 200


def test_tei_tokenize_info_health_qa(served: ServerThread) -> None:
    with httpx.Client(base_url=served.base_url) as http:
        tokens = http.post("/tokenize", json={"inputs": "hello world"}).json()
        assert [t["special"] for t in tokens[0]] == [True, False, False, False, False, True]
        pieces = [t for t in tokens[0] if not t["special"]]
        assert "".join(t["text"] for t in pieces) == "helloworld"
        assert (pieces[0]["start"], pieces[-1]["stop"]) == (0, 11)
        info = http.get("/info").json()
        assert info["served_model_name"] == MODEL
        assert info["max_input_length"] == 64
        assert info["max_client_batch_size"] == 4
        health = http.get("/health")
        assert (health.status_code, health.content) == (200, b"")
        context = "the cat sat on the mat"
        answer = http.post("/qa", json={"question": "where?", "context": context}).json()
        assert context[answer["start"] : answer["end"]] == answer["answer"]
        assert answer["answer"] and 0.0 < answer["score"] <= 1.0
        predict = http.post("/predict", json={"inputs": "x"})
        assert predict.status_code == 422
        assert "classification" in predict.json()["error"]


def test_metrics_exposition(served: ServerThread) -> None:
    with httpx.Client(base_url=served.base_url) as http:
        http.post("/embed", json={"inputs": "metrics please"})
        text = http.get("/metrics").text
    for name in (
        'packrunner_server_requests_total{protocol="tei",route="tei_embed",status="200"}',
        "packrunner_server_request_duration_seconds_bucket",
        "packrunner_server_queue_duration_seconds_bucket",
        "packrunner_server_tokenization_duration_seconds_bucket",
        "packrunner_server_device_duration_seconds_bucket",
        "packrunner_server_batch_samples_bucket",
        "packrunner_server_batch_token_fill_ratio_bucket",
        "packrunner_server_in_flight_requests",
        "packrunner_queue_depth",
        "packrunner_withdrawn_total",
        'packrunner_rejected_total{model="packrunner-bert",reason="overloaded"}',
        "packrunner_server_timed_out_total",
    ):
        assert name in text, name


class ClassifierDevice(SimulatedDevice):
    """A SimulatedDevice with a per-sequence ``logits`` output [B, max_valid_num, 3]:
    (length, sum of ids mod 5, 1) of each packed sequence."""

    def __init__(self) -> None:
        super().__init__(batch_size=2, seq_len=64, batch_latency_us=0)
        self._output_specs = {
            **self._output_specs,
            "logits": OutputSpec("logits", OutputLayout.SEGMENTS, (3,)),
        }

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        outputs = super().run(feeds)
        mask, ids = feeds["attention_mask"], feeds["input_ids"].astype(np.int64)
        logits = np.zeros((self.batch_size, 40, 3), np.float32)
        for row in range(self.batch_size):
            for segment in range(1, int(mask[row].max()) + 1):
                members = mask[row] == segment
                logits[row, segment - 1] = (members.sum(), ids[row][members].sum() % 5, 1.0)
        return {**outputs, "logits": logits}


def test_tei_predict_on_a_classifier() -> None:
    device = ClassifierDevice()
    model = served(
        device,
        "classifier",
        encoder=TextEncoder(build_default_tokenizer(), 64),
        labels=("long", "digest", "bias"),
        max_valid_num=40,
        timeout_us=1000,
    )
    tokenizer = build_default_tokenizer()
    with ServerThread(settings(batch_size=2), model) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            single = http.post("/predict", json={"inputs": "one two three"}).json()
            # Two strings are one (text, text) pair, as in TEI; three are a batch.
            pair = http.post("/predict", json={"inputs": ["a", "b c"]}).json()
            batch = http.post("/predict", json={"inputs": ["a", "b c d e f g", "h"]}).json()
            raw = http.post("/predict", json={"inputs": "a", "raw_scores": True}).json()
            info = http.get("/info").json()
    assert len(batch) == 3
    cases = [
        (tokenizer.encode("one two three").ids, single),
        (tokenizer.encode("a", "b c").ids, pair),
        *(
            (tokenizer.encode(t).ids, a)
            for t, a in zip(["a", "b c d e f g", "h"], batch, strict=True)
        ),
    ]
    for ids, answer in cases:
        logits = np.array([len(ids), sum(ids) % 5, 1.0])
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        expected = sorted(zip(probabilities, model.labels, strict=True), reverse=True)
        assert [a["label"] for a in answer] == [label for _, label in expected]
        np.testing.assert_allclose([a["score"] for a in answer], [p for p, _ in expected])
    assert {a["label"]: a["score"] for a in raw}["long"] == 3.0  # [CLS] a [SEP]
    assert info["model_type"] == {"classifier": {"id2label": {"0": "long", "1": "digest",
                                                               "2": "bias"}}}  # fmt: skip
