"""Routes shaped like Hugging Face text-embeddings-inference (TEI).

``POST /embed`` (``normalize``, ``truncate``), ``POST /tokenize``, ``GET /info``, ``GET /health``,
``POST /predict`` for models with per-sequence class ``logits``, ``POST /rerank`` for those with
one label (a cross-encoder's relevance score: each (query, text) pair runs as one packed
sequence), and an extractive ``POST /qa`` (question + context -> answer span and score) for
models with span logits. Errors are TEI's ``{"error", "error_type"}`` with its status codes (422
validation, 413 payload, 429 overloaded, 503 unhealthy, 424 backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from packrunner._version import __version__
from packrunner.serve.errors import ErrorKind, Protocol, ServeError, invalid
from packrunner.serve.http_common import Call, endpoint, json_body
from packrunner.serve.service import Service

__all__ = ["MAX_ANSWER_TOKENS", "best_span", "tei_routes"]

#: Longest answer span /qa considers, in tokens.
MAX_ANSWER_TOKENS = 30


def _object(call: Call) -> dict[str, Any]:
    body = json_body(call)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _flag(body: dict[str, Any], name: str, default: bool | None) -> bool | None:
    value = body.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean")
    return value


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ServeError(
        ErrorKind.EMPTY if value in ([], "") else ErrorKind.VALIDATION,
        "'inputs' must be a string or a non-empty list of strings",
    )


def _softmax(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    shifted: npt.NDArray[np.float64] = np.exp(values.astype(np.float64) - float(values.max()))
    total = float(shifted.sum())
    return shifted / total


def _scores(logits: npt.NDArray[np.float32], raw: bool) -> npt.NDArray[np.float64]:
    """TEI's classifier activation: none if raw, a sigmoid for one label, else a softmax."""
    values = np.asarray(logits, np.float64)
    if raw:
        return values
    if values.size == 1:
        scores: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-values))
        return scores
    return _softmax(logits)


async def _embed(call: Call) -> Response:
    body = _object(call)
    if "inputs" not in body:
        raise invalid("'inputs' is required")
    service = call.service
    sequences = service.input_ids(body["inputs"], _flag(body, "truncate", None))
    vectors = await service.embed(sequences, service.deadline())
    if _flag(body, "normalize", True):
        vectors = [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors]
    return JSONResponse([v.astype(np.float64).tolist() for v in vectors])


async def _tokenize(call: Call) -> Response:
    body = _object(call)
    texts = _texts(body.get("inputs"))
    service = call.service
    service.check_count(len(texts))
    special = _flag(body, "add_special_tokens", True)
    encoded = service.encoder.encode(
        texts, truncate=service.settings.auto_truncate, add_special_tokens=bool(special)
    )
    answer = []
    for text, tokens in zip(texts, encoded, strict=True):
        answer.append(
            [
                {
                    "id": token_id,
                    "text": token if is_special else text[start:stop],
                    "special": is_special,
                    "start": None if is_special else start,
                    "stop": None if is_special else stop,
                }
                for token_id, token, is_special, (start, stop) in zip(
                    tokens.ids, tokens.tokens, tokens.special, tokens.offsets, strict=True
                )
            ]
        )
    return JSONResponse(answer)


async def _info(call: Call) -> Response:
    service = call.service
    settings, model = service.settings, service.model
    if model.has_classifier:
        kind = "reranker" if model.is_reranker else "classifier"
        model_type: dict[str, object] = {kind: {"id2label": dict(enumerate(model.labels))}}
    else:
        model_type = {"embedding": {"pooling": "mean"}}
    config = model.config
    return JSONResponse(
        {
            "model_id": model.source,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": model.name,
            "model_type": model_type,
            "max_concurrent_requests": settings.max_concurrent_requests,
            "max_input_length": settings.input_limit,
            "max_batch_tokens": config.capacity_tokens,
            "max_batch_requests": config.max_valid_num,
            "max_client_batch_size": settings.max_client_batch_size,
            "auto_truncate": settings.auto_truncate,
            "tokenization_workers": 1,
            "version": __version__,
        }
    )


async def _health(call: Call) -> Response:
    if not call.service.engine.ready:
        raise ServeError(ErrorKind.UNAVAILABLE, "unhealthy", retry_after_s=1)
    return Response(status_code=200)


def _predict_inputs(value: object) -> tuple[Sequence[str | tuple[str, str]], bool]:
    """TEI's shapes: a text, a [text, text] pair, or a batch of texts / pairs."""

    def pair(v: object) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v)

    if isinstance(value, str):
        return [value], True
    if pair(value):
        assert isinstance(value, list)
        return [(value[0], value[1])], True
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, False
    if isinstance(value, list) and value and all(pair(v) for v in value):
        return [(v[0], v[1]) for v in value], False
    raise invalid("'inputs' must be a text, a [text, text] pair, or a list of texts or pairs")


async def _predict(call: Call) -> Response:
    service = call.service
    if not service.model.has_classifier:
        raise invalid("this model has no sequence-classification head (a per-sequence 'logits')")
    body = _object(call)
    texts, single = _predict_inputs(body.get("inputs"))
    service.check_count(len(texts))
    encoded = service.tokenize(texts, _flag(body, "truncate", None))
    results = await service.run_ids(
        [t.ids for t in encoded], service.deadline(), [t.type_ids for t in encoded]
    )
    raw = bool(_flag(body, "raw_scores", False))
    answers = []
    for result in results:
        scores = _scores(np.asarray(result["logits"], np.float32), raw)
        order = np.argsort(-scores, kind="stable")
        answers.append(
            [{"score": float(scores[i]), "label": service.model.labels[i]} for i in order]
        )
    return JSONResponse(answers[0] if single else answers)


async def _rerank(call: Call) -> Response:
    service = call.service
    body = _object(call)
    query, texts = body.get("query"), body.get("texts")
    if not isinstance(query, str):
        raise invalid("'query' must be a string")
    if texts == []:
        raise ServeError(ErrorKind.EMPTY, "`texts` cannot be empty")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise invalid("'texts' must be a list of strings")
    if not service.model.is_reranker:
        # TEI answers a backend error (424) for a model that is no single-label classifier.
        raise ServeError(ErrorKind.BACKEND, "model is not a re-ranker model")
    service.check_count(len(texts))
    encoded = service.tokenize([(query, text) for text in texts], _flag(body, "truncate", None))
    results = await service.run_ids(
        [t.ids for t in encoded], service.deadline(), [t.type_ids for t in encoded]
    )
    raw = bool(_flag(body, "raw_scores", False))
    scores = [float(_scores(np.asarray(r["logits"], np.float32), raw)[0]) for r in results]
    text_too = bool(_flag(body, "return_text", False))
    ranked = sorted(range(len(texts)), key=lambda i: -scores[i])
    return JSONResponse(
        [
            {"index": i, "score": scores[i], **({"text": texts[i]} if text_too else {})}
            for i in ranked
        ]
    )


def best_span(
    start_logits: npt.NDArray[np.float32],
    end_logits: npt.NDArray[np.float32],
    allowed: npt.NDArray[np.bool_],
    max_tokens: int = MAX_ANSWER_TOKENS,
) -> tuple[int, int, float]:
    """The most probable span (start <= end < start + max_tokens) over ``allowed`` tokens.

    Probabilities are softmaxes over the allowed tokens; the score is p(start) * p(end).
    """
    index = np.flatnonzero(allowed)
    if index.size == 0:
        raise invalid("the context is empty after tokenisation")
    p_start = _softmax(start_logits[index])
    p_end = _softmax(end_logits[index])
    joint = np.triu(np.outer(p_start, p_end))
    joint = np.tril(joint, max_tokens - 1)
    best = int(np.argmax(joint))
    first, last = divmod(best, index.size)
    return int(index[first]), int(index[last]), float(joint[first, last])


async def _qa(call: Call) -> Response:
    service = call.service
    if not service.model.has_qa:
        raise invalid("this model has no question-answering head (start_logits/end_logits)")
    body = _object(call)
    question, context = body.get("question"), body.get("context")
    if not isinstance(question, str) or not isinstance(context, str):
        raise invalid("'question' and 'context' must be strings")
    (encoded,) = service.tokenize([(question, context)], _flag(body, "truncate", None))
    (result,) = await service.run_ids([encoded.ids], service.deadline(), [encoded.type_ids])
    pairs = zip(encoded.sequence_ids, encoded.special, strict=True)
    allowed = np.array([seq == 1 and not special for seq, special in pairs])
    first, last, score = best_span(result["start_logits"], result["end_logits"], allowed)
    start, end = encoded.offsets[first][0], encoded.offsets[last][1]
    return JSONResponse({"answer": context[start:end], "score": score, "start": start, "end": end})


def tei_routes(service: Service) -> list[Route]:
    """The TEI-style routes (``/health`` open, the rest behind the API key)."""

    def post(path: str, name: str, handler: Any) -> Route:
        serve = endpoint(service, name, Protocol.TEI, handler, inference=True)
        return Route(path, serve, methods=["POST"])

    return [
        post("/embed", "tei_embed", _embed),
        post("/predict", "tei_predict", _predict),
        post("/rerank", "tei_rerank", _rerank),
        post("/qa", "tei_qa", _qa),
        Route(
            "/tokenize",
            endpoint(service, "tei_tokenize", Protocol.TEI, _tokenize),
            methods=["POST"],
        ),
        Route("/info", endpoint(service, "tei_info", Protocol.TEI, _info), methods=["GET"]),
        Route(
            "/health",
            endpoint(service, "tei_health", Protocol.TEI, _health, protected=False),
            methods=["GET"],
        ),
    ]
