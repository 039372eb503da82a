"""The device interface: what the runner's worker threads drive.

A *device* is anything that executes one fixed-shape batch: the simulated accelerator below, an
onnxruntime session, or (by implementing this interface) a real static-shape accelerator. Each
device is owned by exactly one worker thread, which calls :meth:`Device.open` once, then
:meth:`Device.run` for every batch, then :meth:`Device.close`, all from that same thread. A device
therefore never needs locks of its own.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Device", "OutputLayout", "OutputSpec", "TensorSpec"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, fixed shape and dtype of one device input."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]


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
