"""Health: what a service reports about its runner (liveness, readiness, and why).

A runner is **live** while it can still serve (started, not closed, at least one working
device); **ready** when it is live, warmed up (:meth:`PackRunner.warmup` ran one full batch
through the real path) and not degraded. It is **degraded** after a batch failed (the device
raised, returned outputs that do not match its specs, or exceeded ``device_timeout_s``) until a
batch succeeds again; calling ``warmup()`` again is a way to probe a degraded runner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Health", "HealthState"]


class HealthState(enum.Enum):
    """Where a runner is in its life.

    Attributes:
        STARTING: Created, not started yet (live; not ready).
        WARMING: Running, ``warmup()`` not completed yet (live; not ready).
        READY: Running, warmed up, last batch succeeded (live and ready).
        DEGRADED: Running, but the last batch failed or timed out (live; not ready), or no
            working device is left (not live: requests fail at once with ``DeviceError``).
        CLOSING: ``close()`` began; accepted work is finishing (live; not ready).
        CLOSED: Shut down (neither).
    """

    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    DEGRADED = "degraded"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Health:
    """One reading of :meth:`PackRunner.health`.

    Attributes:
        state: See :class:`HealthState`.
        live: The runner can still serve (a liveness probe fails when this is False).
        ready: It should receive traffic now (a readiness probe).
        reason: Why it is not ready, in words; None when ready.
    """

    state: HealthState
    live: bool
    ready: bool
    reason: str | None
