"""Service: what every front end (OIP REST, gRPC, OpenAI, TEI) shares.

The model, the engine adapter, the metrics, authentication, the effective deadline of a request,
text -> samples and the embedding of a sequence are defined once here, so the protocols differ
only in how they spell requests, answers and errors.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner.runner import Result
from packrunner.serve.engine import BaseEngine
from packrunner.serve.errors import ErrorKind, Protocol, ServeError
from packrunner.serve.metrics import ServeMetrics
from packrunner.serve.model import ServedModel
from packrunner.serve.settings import ServeSettings
from packrunner.serve.tokenizer import TextEncoder, TokenizedText

__all__ = ["ACCESS_LOGGER", "Service"]

#: One structured (JSON) line per request at INFO, when ``--access-log`` is on.
ACCESS_LOGGER = logging.getLogger("packrunner.serve.access")


@dataclass
class Service:
    """The shared state and operations of one server."""

    settings: ServeSettings
    model: ServedModel
    engine: BaseEngine
    metrics: ServeMetrics

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header / metadata value carries the API key."""
        key = self.settings.api_key
        if key is None:
            return True
        return authorization is not None and hmac.compare_digest(
            authorization.encode(), f"Bearer {key}".encode()
        )

    def check_model(self, name: str, version: str | None = None) -> None:
        """Raises NOT_FOUND unless ``name`` (and ``version``, if any) is the served model."""
        if name != self.model.name or version not in (None, "", "1"):
            shown = name if not version else f"{name} version {version}"
            raise ServeError(
                ErrorKind.NOT_FOUND, f"unknown model {shown!r}; this server serves "
                f"{self.model.name!r}"
            )  # fmt: skip

    def deadline(self, *limits_s: float | None) -> float | None:
        """The effective absolute deadline (loop clock): the earliest of the given limits."""
        candidates = [t for t in (self.settings.request_timeout, *limits_s) if t is not None]
        if not candidates:
            return None
        return asyncio.get_running_loop().time() + min(candidates)

    @property
    def encoder(self) -> TextEncoder:
        """The tokenizer (VALIDATION error if the model was served without one)."""
        if self.model.encoder is None:
            raise ServeError(
                ErrorKind.VALIDATION,
                "this model was served without a tokenizer; pass --tokenizer, or send token ids",
            )
        return self.model.encoder

    def tokenize(
        self, texts: Sequence[str | tuple[str, str]], truncate: bool | None
    ) -> list[TokenizedText]:
        """Tokenise texts (``truncate`` None: ``--auto-truncate``), timing it in the metrics."""
        started = time.monotonic()
        encoded = self.encoder.encode(
            texts, truncate=self.settings.auto_truncate if truncate is None else truncate
        )
        self.metrics.tokenization_duration.observe(time.monotonic() - started)
        return encoded

    def check_count(self, count: int) -> None:
        """Refuse empty requests and more sequences than ``--max-client-batch-size``."""
        if count == 0:
            raise ServeError(ErrorKind.EMPTY, "no inputs")
        limit = self.settings.max_client_batch_size
        if count > limit:
            raise ServeError(
                ErrorKind.TOO_MANY_SEQUENCES,
                f"batch size {count} > maximum allowed batch size {limit} (max_client_batch_size)",
            )

    def check_ids(
        self, sequences: Sequence[Sequence[int]], truncate: bool | None
    ) -> list[list[int]]:
        """Token-id inputs, validated like texts (count, emptiness, length / truncation)."""
        self.check_count(len(sequences))
        limit = self.settings.input_limit
        allowed = self.settings.auto_truncate if truncate is None else truncate
        out = []
        for index, ids in enumerate(sequences):
            if not ids:
                raise ServeError(ErrorKind.EMPTY, f"input {index} is empty")
            if len(ids) > limit and not allowed:
                raise ServeError(
                    ErrorKind.VALIDATION,
                    f"input {index} has {len(ids)} tokens, more than max_input_length={limit}",
                )
            out.append(list(ids[:limit]))
        return out

    def input_ids(self, value: object, truncate: bool | None) -> list[list[int]]:
        """Token ids of an OpenAI/TEI ``input``: str, [str], [int] or [[int]].

        Raises:
            ServeError: VALIDATION / EMPTY / TOO_MANY_SEQUENCES as the input deserves.
        """
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ServeError(
                ErrorKind.EMPTY if value == [] else ErrorKind.VALIDATION,
                "input must be a string, a list of strings, a list of token ids or a list of "
                "lists of token ids",
            )
        if all(isinstance(v, str) for v in value):
            self.check_count(len(value))
            return [t.ids for t in self.tokenize(value, truncate)]
        if all(_is_id(v) for v in value):
            value = [value]
        if all(isinstance(v, list) and all(_is_id(i) for i in v) for v in value):
            return self.check_ids(value, truncate)
        raise ServeError(
            ErrorKind.VALIDATION,
            "input must be a string, a list of strings, a list of token ids or a list of lists "
            "of token ids",
        )

    async def run_ids(
        self,
        sequences: Sequence[Sequence[int]],
        deadline: float | None,
        type_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[Result]:
        """Run token-id sequences (one sample each) and return their results in order."""
        samples = []
        for index, ids in enumerate(sequences):
            sample = {"input_ids": np.asarray(ids, dtype=np.int64)}
            if type_ids is not None:
                sample["token_type_ids"] = np.asarray(type_ids[index], dtype=np.int64)
            samples.append(sample)
        return await self.engine.run(samples, deadline)

    async def embed(
        self, sequences: Sequence[Sequence[int]], deadline: float | None
    ) -> list[npt.NDArray[np.float32]]:
        """Embeddings of token-id sequences (VALIDATION if the model has none)."""
        if self.model.embedding_output is None:
            raise ServeError(
                ErrorKind.VALIDATION,
                "this model has no embedding output (last_hidden_state or sentence_embedding)",
            )
        results = await self.run_ids(sequences, deadline)
        return [self.model.embedding(result) for result in results]

    def record(
        self,
        route: str,
        protocol: Protocol,
        status: str,
        started: float,
        failure: ServeError | None,
        **details: Any,
    ) -> None:
        """Count one answered request (metrics, and the access log if enabled)."""
        elapsed = time.monotonic() - started
        metrics = self.metrics
        metrics.requests.labels(route, protocol.value, status).inc()
        metrics.request_duration.labels(route, protocol.value).observe(elapsed)
        if failure is not None:
            metrics.failures.labels(failure.kind.reason).inc()
        if self.settings.access_log and ACCESS_LOGGER.isEnabledFor(logging.INFO):
            line = {
                "route": route,
                "protocol": protocol.value,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                **details,
            }
            if failure is not None:
                line["error"] = failure.message
            ACCESS_LOGGER.info(json.dumps(line, separators=(",", ":")))


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
