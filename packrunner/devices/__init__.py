"""Devices: what a runner's worker threads drive.

:class:`Device` is the interface (one batch in, of a shape its :class:`ShapeSet` allows;
outputs by declared layout out);
:class:`SimulatedDevice` is a deterministic stand-in accelerator with an exact reference, and
:class:`OnnxDevice` runs an ONNX model under onnxruntime.
"""

from __future__ import annotations

from packrunner.devices.base import (
    BatchShape,
    Device,
    OutputLayout,
    OutputSpec,
    ShapeSet,
    TensorSpec,
)
from packrunner.devices.onnx import BATCH_COUPLING_OPS, OnnxDevice
from packrunner.devices.simulated import (
    POPRT_IPU_BATCH_LATENCY_US,
    SimulatedDevice,
    simulated_reference,
)

__all__ = [
    "BATCH_COUPLING_OPS",
    "POPRT_IPU_BATCH_LATENCY_US",
    "BatchShape",
    "Device",
    "OnnxDevice",
    "OutputLayout",
    "OutputSpec",
    "ShapeSet",
    "SimulatedDevice",
    "TensorSpec",
    "simulated_reference",
]
