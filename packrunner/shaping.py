"""Shape-aware planning: the shape of each batch, and its samples, chosen together.

A device that runs several shapes (:class:`~packrunner.ShapeSet`: compiled buckets or dynamic
axes) should not pack short samples into 256-wide rows: every row pays attention over its whole
width. :func:`plan_shaped` plans the next batch once per candidate shape, with the runner's own
packing algorithm (:func:`~packrunner.packing.plan_batch`) over the waiting samples that fit that
width, and keeps the plan that serves the most tokens per estimated second
(:class:`~packrunner.cost.CostModel`). Short samples therefore go into narrow rows, long ones
into wide rows; on a dynamic device the width is the longest packed row rounded up to the
device's width multiple, and unused rows are dropped.

Starvation bound: every candidate shape is at least as wide as the *oldest* waiting sample, and
every packing algorithm places its first candidate first, so the oldest waiting sample is in
every batch. A sample with ``p`` older samples waiting is therefore dispatched within ``p + 1``
batches, whatever arrives after it.

Pure numpy and Python, no device, no asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from packrunner.config import PackAlgorithm
from packrunner.devices.base import BatchShape, ShapeSet
from packrunner.packing import PackPlan, plan_batch

__all__ = ["MAX_DYNAMIC_WIDTHS", "candidate_shapes", "plan_shaped"]

MAX_DYNAMIC_WIDTHS = 5
"""Widths a dynamic device's plan is tried at per batch (planning cost grows with it)."""

MARGIN = 1.05
"""How much more tokens per estimated second a narrower shape must serve than the best wider
one to be chosen. Taking the short samples into a narrow batch leaves the long ones to pack
among themselves later, which packs them less well than short fillers would: per batch the
narrow plan looks better than it is for the whole queue, by a few percent on the seed
distribution (measured by draining it). For the same reason a plan that takes every waiting
sample beats any that leaves some behind."""


def candidate_shapes(lengths: Sequence[int], shapes: ShapeSet) -> list[BatchShape]:
    """The shapes worth planning the next batch at: those that hold the oldest sample.

    Compiled sets: every compiled shape at least as wide as ``lengths[0]``. Dynamic sets: the
    widest batch (most rows) at up to :data:`MAX_DYNAMIC_WIDTHS` widths, spread over the rounded
    lengths of the waiting samples from the oldest's up to the longest's.
    """
    oldest = lengths[0]
    if shapes.compiled:
        return [shape for shape in shapes.compiled if shape[1] >= oldest]
    floor = shapes.round_width(oldest)
    widths = sorted({w for w in (shapes.round_width(n) for n in lengths) if w >= floor})
    if len(widths) > MAX_DYNAMIC_WIDTHS:
        picks = np.linspace(0, len(widths) - 1, MAX_DYNAMIC_WIDTHS).round().astype(int)
        widths = [widths[i] for i in sorted(set(picks.tolist()))]
    return [(shapes.rows_for(width), width) for width in widths]


def plan_shaped(
    lengths: Sequence[int],
    *,
    algorithm: PackAlgorithm,
    shapes: ShapeSet,
    cost: Callable[[BatchShape], float],
    max_valid_num: int,
    lookahead: int = 256,
) -> PackPlan:
    """The next batch's shape and samples: the most tokens per estimated second.

    Args:
        lengths: Lengths of the queued samples, oldest first, each at most
            ``shapes.max_width``.
        algorithm: The packing rule used at each candidate shape (not ``STREAM``: its samples
            cross rows of one fixed stream).
        shapes: What the device runs.
        cost: Estimated seconds of a batch of a shape (e.g. ``CostModel.estimate``).
        max_valid_num: Most samples per batch.
        lookahead: How many of the oldest samples are considered.

    Returns:
        The plan, with :attr:`~packrunner.packing.PackPlan.shape` set; ``chosen`` indexes
        ``lengths``. ``full`` is True when the batch at some candidate shape could take no more
        samples (waiting would not give a fuller batch). At least one sample is chosen whenever
        ``lengths`` is not empty.

    Raises:
        ValueError: ``algorithm`` is ``STREAM``, or the oldest sample is wider than every shape.
    """
    if algorithm is PackAlgorithm.STREAM:
        raise ValueError("shape-aware planning packs rows; algorithm=stream has no row shapes")
    window = list(lengths[:lookahead])
    if not window:
        empty = np.zeros(0, dtype=np.int64)
        return PackPlan((), empty, empty, empty, False, None)
    candidates = candidate_shapes(window, shapes)
    if not candidates:
        raise ValueError(f"no shape holds a sample of {window[0]} tokens")
    best: PackPlan | None = None
    best_rate = -1.0
    best_clears = False  # takes every waiting sample: no leftover batch after it
    any_full = False
    # Widest first: it is the reference a narrower shape must beat by MARGIN.
    for rows, width in sorted(candidates, key=lambda shape: -shape[1]):
        fitting = [i for i, n in enumerate(window) if n <= width]
        if best is not None:
            # Skip a shape that could not win even filled with every sample that fits it.
            bound = min(sum(window[i] for i in fitting), rows * width)
            clears = len(fitting) == len(lengths)
            if (best_clears and not clears) or bound / max(
                cost((rows, width)), 1e-12
            ) <= best_rate * MARGIN:
                continue
        plan = plan_batch(
            [window[i] for i in fitting],
            algorithm=algorithm,
            batch_size=rows,
            seq_len=width,
            max_valid_num=max_valid_num,
            lookahead=len(fitting),
        )
        any_full = any_full or plan.full
        plan = _at_shape(plan, [fitting[k] for k in plan.chosen], (rows, width), shapes)
        assert plan.shape is not None
        rate = plan.num_tokens / max(cost(plan.shape), 1e-12)
        clears = plan.num_samples == len(lengths)
        if best is None or (clears, rate) > (best_clears, best_rate * MARGIN):
            best, best_rate, best_clears = plan, rate, clears
    assert best is not None
    return PackPlan(best.chosen, best.lengths, best.starts, best.segment_ids, any_full, best.shape)


def _at_shape(plan: PackPlan, chosen: list[int], shape: BatchShape, shapes: ShapeSet) -> PackPlan:
    """``plan`` (made at ``shape``) with indices into the window, at the shape it will run.

    A dynamic device runs only the rows used, each as wide as the fullest one rounded up to the
    width multiple; compiled shapes run as they are.
    """
    rows, width = shape
    starts = plan.starts
    if shapes.is_dynamic and plan.num_samples:
        row, offset = np.divmod(plan.starts, width)
        rows = int(row.max()) + 1
        width = shapes.round_width(int((offset + plan.lengths).max()))
        starts = row * width + offset
    return PackPlan(tuple(chosen), plan.lengths, starts, plan.segment_ids, plan.full, (rows, width))
