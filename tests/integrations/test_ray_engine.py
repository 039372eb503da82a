"""HandleEngine's answers to what a deployment handle can do, without a cluster.

The handle is replaced by one whose responses are plain awaitables: each answers, raises one of
Ray's exceptions, or never answers; the engine must turn each into the service's error (or the
results), and cancel the replica's work whenever it stops waiting without an answer.
(tests/integrations/test_ray_serve.py runs the same engine against real replicas.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import numpy as np
import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from packrunner.errors import InvalidSampleError
from packrunner.integrations.ray import HandleEngine
from packrunner.serve.errors import ErrorKind, ServeError
from packrunner.serve.metrics import ServeMetrics

SAMPLES = [{"input_ids": np.array([101, 7, 102])}]


class _Response:
    """A DeploymentResponse stand-in: awaiting it runs ``outcome``; ``cancel`` is recorded."""

    def __init__(self, outcome: Callable[[], Awaitable[Any]]) -> None:
        self._outcome = outcome
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self._outcome().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """``handle.run.remote(samples, timeout)`` returns the next response and records the call."""

    def __init__(self, response: _Response) -> None:
        self.response = response
        self.calls: list[tuple[Any, ...]] = []
        self.run = self

    def remote(self, *args: Any) -> _Response:
        self.calls.append(args)
        return self.response


def _engine(response: _Response) -> tuple[HandleEngine, _Handle, ServeMetrics]:
    handle = _Handle(response)
    metrics = ServeMetrics("m", 8)
    return HandleEngine(handle, metrics, max_concurrent_requests=4), handle, metrics  # type: ignore[arg-type]


async def _run(engine: HandleEngine, deadline_in_s: float | None = None) -> Any:
    await engine.start()
    deadline = None
    if deadline_in_s is not None:
        deadline = asyncio.get_running_loop().time() + deadline_in_s
    with engine.admit():
        return await engine.run(SAMPLES, deadline)


async def test_results_pass_through_with_the_remaining_time() -> None:
    result = [{"start_logits": np.zeros(3, np.float32)}]

    async def answer() -> Any:
        return result

    engine, handle, _ = _engine(_Response(answer))
    assert await _run(engine, deadline_in_s=30) is result
    ((samples, timeout),) = handle.calls
    assert samples == SAMPLES and 0 < timeout <= 30
    assert not handle.response.cancelled


async def test_the_replicas_own_error_is_answered_as_is() -> None:
    refusal = ServeError(ErrorKind.VALIDATION, "id out of range")

    async def refuse() -> Any:
        # What Ray raises: the replica's exception, as the cause of a RayTaskError.
        from ray.exceptions import RayTaskError

        raise RayTaskError("run", "traceback", refusal)

    engine, handle, _ = _engine(_Response(refuse))
    with pytest.raises(ServeError) as raised:
        await _run(engine)
    assert raised.value.kind is ErrorKind.VALIDATION and raised.value.message == "id out of range"
    assert handle.response.cancelled


async def test_other_replica_failures_are_backend_errors() -> None:
    async def fail() -> Any:
        from ray.exceptions import RayTaskError

        raise RayTaskError("run", "traceback", InvalidSampleError("boom"))

    engine, _, _ = _engine(_Response(fail))
    with pytest.raises(ServeError) as raised:
        await _run(engine)
    assert raised.value.kind is ErrorKind.BACKEND


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), ErrorKind.OVERLOADED),
        (ActorDiedError(), ErrorKind.UNAVAILABLE),
    ],
    ids=["back-pressure", "replica-died"],
)
async def test_ray_failures_map_to_retryable_errors(error: Exception, kind: ErrorKind) -> None:
    async def fail() -> Any:
        raise error

    engine, handle, _ = _engine(_Response(fail))
    with pytest.raises(ServeError) as raised:
        await _run(engine)
    assert raised.value.kind is kind and raised.value.retry_after_s == 1
    assert handle.response.cancelled


async def test_an_expired_deadline_cancels_the_replicas_work() -> None:
    never = asyncio.Event()

    async def hang() -> Any:
        await never.wait()

    engine, handle, metrics = _engine(_Response(hang))
    with pytest.raises(ServeError) as raised:
        await _run(engine, deadline_in_s=0.05)
    assert raised.value.kind is ErrorKind.DEADLINE
    assert handle.response.cancelled
    assert metrics.registry.get_sample_value("packrunner_server_timed_out_total") == 1


async def test_a_cancelled_request_cancels_the_replicas_work() -> None:
    started = asyncio.Event()

    async def hang() -> Any:
        started.set()
        await asyncio.Event().wait()

    engine, handle, _ = _engine(_Response(hang))
    task = asyncio.ensure_future(_run(engine))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handle.response.cancelled
