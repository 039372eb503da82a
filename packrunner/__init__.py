"""packrunner: an asynchronous online pack-runner for transformer encoders on static-shape devices.

Clients submit ONE variable-length sample at a time; the runner packs queued samples into fixed
``[batch_size, seq_len]`` batches (several samples per row, block-diagonal attention through
segment ids, positions restarting per sample), runs them on a device thread and hands every
caller its own outputs.
"""

from __future__ import annotations

from packrunner._version import __version__
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.devices import (
    POPRT_IPU_BATCH_LATENCY_US,
    Device,
    OnnxDevice,
    OutputLayout,
    OutputSpec,
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
from packrunner.stats import RunnerStats

__all__ = [
    "ConfigError",
    "ConversionError",
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
    "SimulatedDevice",
    "TensorSpec",
    "__version__",
    "build_feeds",
    "plan_batch",
    "simulated_reference",
    "unpack_outputs",
]
