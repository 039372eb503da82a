"""OpenAI-compatible ``POST /v1/embeddings`` (and ``GET /v1/models``).

``input`` is a string, a list of strings, a list of token ids or a list of lists of token ids;
``encoding_format`` ``float`` or ``base64`` (little-endian float32 bytes, what the official client
asks for by default). Errors use OpenAI's nested ``{"error": {"message", "type", "param",
"code"}}``; overload is 429 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from packrunner.serve.errors import Protocol, invalid
from packrunner.serve.http_common import Call, endpoint, json_body
from packrunner.serve.service import Service

__all__ = ["openai_routes"]

_CREATED = int(time.time())


async def _embeddings(call: Call) -> Response:
    service = call.service
    body = json_body(call)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("'model' is required")
    service.check_model(model)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid(f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != service.model.hidden_size:
        raise invalid(
            f"dimensions={dimensions!r} is not supported; this model's embeddings have "
            f"{service.model.hidden_size}"
        )
    if "input" not in body:
        raise invalid("'input' is required")
    sequences = service.input_ids(body["input"], truncate=None)
    vectors = await service.embed(sequences, service.deadline())
    data = []
    for index, vector in enumerate(vectors):
        embedding: object
        if encoding == "base64":
            embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        else:
            embedding = vector.astype(np.float64).tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(s) for s in sequences)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": service.model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def _models(call: Call) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": call.service.model.name,
                    "object": "model",
                    "created": _CREATED,
                    "owned_by": "packrunner",
                }
            ],
        }
    )


def openai_routes(service: Service) -> list[Route]:
    """``POST /v1/embeddings`` (inference) and ``GET /v1/models``, behind the API key."""
    return [
        Route(
            "/v1/embeddings",
            endpoint(service, "openai_embeddings", Protocol.OPENAI, _embeddings, inference=True),
            methods=["POST"],
        ),
        Route(
            "/v1/models",
            endpoint(service, "openai_models", Protocol.OPENAI, _models),
            methods=["GET"],
        ),
    ]
