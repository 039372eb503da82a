"""The cost model: estimated device time of a batch of shape ``[rows, width]``.

A transformer encoder's batch costs a fixed part (launch, per-run overhead), a part linear in
its token slots (projections, feed-forward, layer norms: ``rows * width``) and attention, which
is quadratic in the row width (``rows * width**2``). :class:`BatchCost` is that curve;
:class:`CostModel` is one device's estimate: the measured median for every shape it timed (a
bucket is exactly what was measured) and the least-squares curve through them elsewhere (a
dynamic device's untimed shapes). Pure Python and numpy: the runner calibrates it at warm-up
from the device times of real batches, and tests calibrate it against synthetic devices.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # devices import the cost curve (SimulatedDevice's latency): no cycle
    from packrunner.devices.base import BatchShape, ShapeSet

__all__ = ["BatchCost", "CostModel", "calibrate"]


@dataclass(frozen=True, slots=True)
class BatchCost:
    """``fixed_s + per_token_s * rows * width + per_token_width_s * rows * width**2`` seconds.

    Attributes:
        fixed_s: Per-batch overhead.
        per_token_s: Per token slot (padding included: the device computes it anyway).
        per_token_width_s: Per token slot and per unit of row width (attention).
    """

    fixed_s: float
    per_token_s: float
    per_token_width_s: float

    def __call__(self, shape: BatchShape) -> float:
        """Seconds for one batch of ``shape``."""
        rows, width = shape
        slots = rows * width
        return self.fixed_s + self.per_token_s * slots + self.per_token_width_s * slots * width

    @classmethod
    def fit(cls, timings: Mapping[BatchShape, float]) -> BatchCost:
        """Least squares through ``{shape: seconds}``, every coefficient kept non-negative.

        A term whose unconstrained coefficient comes out negative (noise, too few shapes) is
        dropped and the rest refitted: a cost never falls as a batch grows.

        Raises:
            ValueError: No timings.
        """
        if not timings:
            raise ValueError("no timings to fit")
        shapes = list(timings)
        slots = np.array([r * w for r, w in shapes], dtype=np.float64)
        widths = np.array([w for _, w in shapes], dtype=np.float64)
        seconds = np.array([timings[s] for s in shapes], dtype=np.float64)
        columns = [np.ones_like(slots), slots, slots * widths]
        kept = [0, 1, 2]
        while True:
            design = np.stack([columns[k] for k in kept], axis=1)
            solution, *_ = np.linalg.lstsq(design, seconds, rcond=None)
            negative = [k for k, c in zip(kept, solution, strict=True) if c < 0]
            if not negative:
                break
            kept = [k for k in kept if k != negative[0]]
            if not kept:
                solution = np.zeros(0)
                break
        coefficients = [0.0, 0.0, 0.0]
        for k, c in zip(kept, solution, strict=True):
            coefficients[k] = float(c)
        return cls(*coefficients)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Estimated seconds per batch shape of one device.

    Attributes:
        curve: The fitted (or prior) curve, used for shapes that were not timed.
        measured: Median measured seconds of the shapes that were timed.
        calibrated: Whether this comes from measurements (False: the prior).
    """

    curve: BatchCost
    measured: Mapping[BatchShape, float] = field(default_factory=dict)
    calibrated: bool = False

    def estimate(self, shape: BatchShape) -> float:
        """Seconds for one batch of ``shape``: measured if timed, else the curve."""
        seconds = self.measured.get(shape)
        return seconds if seconds is not None else self.curve(shape)

    @classmethod
    def prior(cls, shapes: ShapeSet) -> CostModel:
        """The uncalibrated estimate: time grows with token slots and row width.

        Scaled so that a full widest batch costs 1: a fixed part worth a tenth of it, attention
        worth half the linear part at the widest row. Only the ratios matter to the planner.
        """
        unit = 1.0 / shapes.max_tokens
        return cls(BatchCost(0.1, 0.6 * unit, 0.3 * unit / shapes.max_width))

    @classmethod
    def from_timings(cls, timings: Mapping[BatchShape, Sequence[float]]) -> CostModel:
        """The model of a device whose shapes were timed (several runs per shape).

        Raises:
            ValueError: No timings, or a shape with no runs.
        """
        if any(not runs for runs in timings.values()):
            raise ValueError("every timed shape needs at least one run")
        medians = {shape: float(statistics.median(runs)) for shape, runs in timings.items()}
        return cls(BatchCost.fit(medians), medians, calibrated=True)


def calibrate(
    measure: Callable[[BatchShape], float], shapes: Iterable[BatchShape], *, runs: int = 3
) -> CostModel:
    """Time each shape ``runs`` times with ``measure`` (seconds of one batch) and fit.

    The runner calibrates through its own batches instead (:meth:`CostModel.from_timings` on
    their device times); this is the direct form, for devices driven by hand.

    Raises:
        ValueError: ``runs`` below 1 or no shapes.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    timings = {shape: [measure(shape) for _ in range(runs)] for shape in shapes}
    return CostModel.from_timings(timings)
