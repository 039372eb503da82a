"""The device interface: what the runner's worker threads drive.

A *device* is anything that executes one batch of a shape it can run: the simulated accelerator
below, an onnxruntime session, or (by implementing this interface) a real static-shape
accelerator. :attr:`Device.shapes` says which ``[rows, width]`` batches it runs: its one compiled
shape (the default, read from :attr:`Device.input_specs`), a set of compiled shapes (buckets), or
any shape within a budget (dynamic axes). Each
device is owned by exactly one worker thread, which calls :meth:`Device.open` once, then
:meth:`Device.run` for every batch, then :meth:`Device.close`, all from that same thread. A device
therefore never needs locks of its own.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BatchShape", "Device", "OutputLayout", "OutputSpec", "ShapeSet", "TensorSpec"]

BatchShape = tuple[int, int]
"""``(rows, width)`` of one batch: its ``[rows, width]`` token tensors."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, fixed shape and dtype of one device input."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]


@dataclass(frozen=True, slots=True)
class ShapeSet:
    """The ``[rows, width]`` batch shapes a device can run.

    Either a set of compiled shapes (one: a static-shape device, the default; several: buckets,
    e.g. ``[64, 64]``, ``[32, 128]``, ``[16, 256]``), or, with dynamic axes, any shape with
    ``rows <= max_rows``, ``width <= max_width``, ``rows * width <= max_tokens`` and ``width`` a
    multiple of ``width_multiple`` (or ``max_width`` itself). Build one with :meth:`fixed`,
    :meth:`buckets` or :meth:`dynamic`.

    Attributes:
        compiled: The compiled shapes, sorted by width then rows (empty when dynamic).
        max_rows: Most rows of a batch.
        max_width: Widest row: the longest sample the device can take.
        max_tokens: Most ``rows * width`` token slots of one batch.
        width_multiple: Dynamic widths are rounded up to this (1 for compiled sets).
    """

    compiled: tuple[BatchShape, ...]
    max_rows: int
    max_width: int
    max_tokens: int
    width_multiple: int = 1

    @classmethod
    def fixed(cls, rows: int, width: int) -> ShapeSet:
        """One compiled shape: today's static-shape devices."""
        return cls.buckets([(rows, width)])

    @classmethod
    def buckets(cls, shapes: Iterable[BatchShape]) -> ShapeSet:
        """A set of compiled shapes (e.g. one per optimisation profile or compiled graph).

        Raises:
            ValueError: No shape, or a dimension that is not a positive int.
        """
        unique = {(_positive("rows", r), _positive("width", w)) for r, w in shapes}
        compiled = tuple(sorted(unique, key=lambda shape: (shape[1], shape[0])))
        if not compiled:
            raise ValueError("a ShapeSet needs at least one shape")
        return cls(
            compiled,
            max_rows=max(r for r, _ in compiled),
            max_width=max(w for _, w in compiled),
            max_tokens=max(r * w for r, w in compiled),
        )

    @classmethod
    def dynamic(
        cls,
        *,
        max_rows: int,
        max_width: int,
        max_tokens: int | None = None,
        width_multiple: int = 8,
    ) -> ShapeSet:
        """Any shape up to a budget (a model with dynamic batch and sequence axes).

        Args:
            max_rows: Most rows of a batch.
            max_width: Widest row (the longest sample accepted).
            max_tokens: Most token slots per batch; default ``max_rows * max_width``.
            width_multiple: Widths are rounded up to a multiple of this (vector-friendly sizes
                the runtime likes, and fewer distinct shapes to plan over).

        Raises:
            ValueError: A size that is not a positive int, or a budget below one full-width row.
        """
        tokens = max_rows * max_width if max_tokens is None else max_tokens
        shape_set = cls(
            (),
            max_rows=_positive("max_rows", max_rows),
            max_width=_positive("max_width", max_width),
            max_tokens=_positive("max_tokens", tokens),
            width_multiple=_positive("width_multiple", width_multiple),
        )
        if tokens < max_width:
            raise ValueError(f"max_tokens={tokens} cannot hold one row of max_width={max_width}")
        return shape_set

    @property
    def is_dynamic(self) -> bool:
        """Whether any shape within the budget runs (no compiled list)."""
        return not self.compiled

    @property
    def is_single(self) -> bool:
        """Whether exactly one shape runs (a static-shape device)."""
        return len(self.compiled) == 1

    def round_width(self, tokens: int) -> int:
        """The narrowest width this set runs that holds ``tokens`` (dynamic sets only)."""
        multiple = self.width_multiple
        return min(self.max_width, -(-tokens // multiple) * multiple)

    def rows_for(self, width: int) -> int:
        """Most rows of a dynamic batch ``width`` wide."""
        return min(self.max_rows, self.max_tokens // width)

    def __contains__(self, shape: object) -> bool:
        """Whether the device runs ``(rows, width)``."""
        if not isinstance(shape, tuple) or len(shape) != 2:
            return False
        rows, width = shape
        if not isinstance(rows, int) or not isinstance(width, int):
            return False
        if self.compiled:
            return shape in self.compiled
        return (
            1 <= rows <= self.max_rows
            and 1 <= width <= self.max_width
            and rows * width <= self.max_tokens
            and (width % self.width_multiple == 0 or width == self.max_width)
        )

    def calibration_shapes(self) -> tuple[BatchShape, ...]:
        """Shapes worth timing to calibrate a cost model: every compiled one; for dynamic sets
        a small grid (three widths from narrow to widest, full and quarter rows)."""
        if self.compiled:
            return self.compiled
        narrow = self.round_width(max(self.width_multiple, self.max_width // 8))
        middle = self.round_width(max(narrow + 1, self.max_width // 2))
        grid: list[BatchShape] = []
        for width in sorted({narrow, middle, self.max_width}):
            most = self.rows_for(width)
            grid.extend((rows, width) for rows in sorted({max(1, most // 4), most}))
        return tuple(grid)


def _positive(label: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive int, got {value!r}")
    return value


class OutputLayout(enum.Enum):
    """How an output tensor is laid out, which decides how it is cut back per sample.

    Attributes:
        PACKED_TOKENS: ``[batch_size, seq_len, ...]``; sample ``k`` owns the token positions it was
            packed into (``[row, offset:offset + length]``, or a run of the flattened token stream
            in across-rows mode).
        SAMPLE_TOKENS: ``[max_valid_num, seq_len, ...]``; slot ``k`` holds sample ``k``'s tokens
            from position 0 (models that unpack to one sample per row, e.g. unpack/repack mode).
        SEGMENTS: ``[batch_size, max_segments, ...]``; entry ``[row, segment_id - 1]`` holds one
            value per sample (e.g. a pooled sentence embedding).
        SAMPLES: ``[max_valid_num, ...]``; slot ``k`` holds one value for sample ``k`` (e.g. a
            pooled embedding from an unpack/repack model).
        ROWS: ``[batch_size, ...]``; one value per row. Only meaningful with one sample per row
            (``PackAlgorithm.PADDED``), e.g. the pooled output of a padded model.
    """

    PACKED_TOKENS = "packed_tokens"
    SAMPLE_TOKENS = "sample_tokens"
    SEGMENTS = "segments"
    SAMPLES = "samples"
    ROWS = "rows"


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """Name, layout and per-element shape (the dims after the layout's leading two) of an output."""

    name: str
    layout: OutputLayout
    trailing_shape: tuple[int, ...] = ()


class Device(ABC):
    """A static-shape executor of packed batches.

    Implementations must accept exactly the feeds described by :attr:`input_specs` and return,
    for each name in :attr:`output_specs`, an array laid out as that spec says.
    """

    @property
    @abstractmethod
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """The compiled inputs, by name."""

    @property
    @abstractmethod
    def output_specs(self) -> Mapping[str, OutputSpec]:
        """The outputs, by name."""

    @property
    def shapes(self) -> ShapeSet:
        """The ``[rows, width]`` batches this device runs.

        Default: the one shape of its 2-D :attr:`input_specs` (a static-shape device). Devices
        that run several shapes override it; their :attr:`input_specs` then describe the widest
        shape (the runner config's), and each batch's feeds come at the shape the planner chose.
        """
        shapes = {spec.shape for spec in self.input_specs.values() if len(spec.shape) == 2}
        if len(shapes) != 1:
            raise ValueError(f"the device's 2-D inputs do not share one shape: {sorted(shapes)}")
        rows, width = shapes.pop()
        return ShapeSet.fixed(rows, width)

    @property
    def input_value_limits(self) -> Mapping[str, int]:
        """Exclusive upper bound of the values of some inputs (e.g. vocabulary sizes).

        The runner refuses samples beyond them at submit time, so one bad id cannot fail a
        whole batch on the device. Default: none known.
        """
        return {}

    def open(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Acquire the device. Called once, from the worker thread that will run it."""

    @abstractmethod
    def run(
        self, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Execute one batch. Raise on any failure: the runner fails only this batch's requests."""

    def close(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Release the device. Called once, from the worker thread, after the last run."""

    def replica(self) -> Device | None:
        """A fresh, unopened device identical to this one, to replace it after it hung.

        When a batch exceeds ``RunnerConfig.device_timeout_s`` the runner abandons the worker
        thread stuck in :meth:`run` (it may never return) and calls this, on a new worker
        thread, to open a replacement. Return None (the default) when the device cannot be
        duplicated: the runner then serves on its remaining devices, and once none is left it
        reports itself not live and fails requests at once with :class:`~packrunner.DeviceError`.
        """
        return None
