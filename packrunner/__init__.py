"""packrunner: an asynchronous online pack-runner for transformer encoders on static-shape devices.

Clients submit ONE variable-length sample at a time; the runner packs queued samples into
``[batch_size, seq_len]`` batches (several samples per row, block-diagonal attention through
segment ids, positions restarting per sample; on a device that runs several shapes, at the shape
that serves the most tokens per estimated second), runs them on a device thread and hands every
caller its own outputs.
"""

from __future__ import annotations

from packrunner._version import __version__
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.cost import BatchCost, CostModel
from packrunner.devices import (
    POPRT_IPU_BATCH_LATENCY_US,
    BatchShape,
    Device,
    OnnxDevice,
    OutputLayout,
    OutputSpec,
    ShapeSet,
    SimulatedDevice,
    TensorSpec,
    simulated_reference,
)
from packrunner.errors import (
    ConfigError,
    ConversionError,
    DeviceError,
    DeviceTimeoutError,
    InvalidSampleError,
    ModelFormatError,
    OverloadedError,
    PackRunnerError,
    RequestTimeoutError,
    RunnerClosedError,
    RunnerNotStartedError,
)
from packrunner.health import Health, HealthState
from packrunner.packing import PackPlan, build_feeds, plan_batch, unpack_outputs
from packrunner.runner import PackRunner, Result
from packrunner.shaping import plan_shaped
from packrunner.stats import RunnerStats

__all__ = [
    "BatchCost",
    "BatchShape",
    "ConfigError",
    "ConversionError",
    "CostModel",
    "Device",
    "DeviceError",
    "DeviceTimeoutError",
    "Health",
    "HealthState",
    "InputForm",
    "InvalidSampleError",
    "ModelFormatError",
    "OnnxDevice",
    "OutputLayout",
    "OutputSpec",
    "OverloadedError",
    "POPRT_IPU_BATCH_LATENCY_US",
    "PackAlgorithm",
    "PackPlan",
    "PackRunner",
    "PackRunnerError",
    "RequestTimeoutError",
    "Result",
    "RunnerClosedError",
    "RunnerConfig",
    "RunnerNotStartedError",
    "RunnerStats",
    "ShapeSet",
    "SimulatedDevice",
    "TensorSpec",
    "__version__",
    "build_feeds",
    "plan_batch",
    "plan_shaped",
    "simulated_reference",
    "unpack_outputs",
]
