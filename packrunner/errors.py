"""Exceptions raised by packrunner.

Every error a caller can see derives from :class:`PackRunnerError`::

    PackRunnerError
    ├── ConfigError (also ValueError)          a RunnerConfig field is out of range
    ├── InvalidSampleError (also ValueError)   a sample is rejected at submit time
    ├── OverloadedError                        the queue is at max_queue_size
    ├── RunnerNotStartedError (also RuntimeError)
    ├── RunnerClosedError                      the runner is closing or closed
    ├── RequestTimeoutError (also TimeoutError) a blocking execute() gave up waiting
    ├── DeviceError                            the device raised while running a batch
    ├── ConversionError (also ValueError)      packrunner.convert: an ONNX graph it cannot convert
    └── ModelFormatError (also ValueError)     packrunner.models: a checkpoint it cannot read
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConversionError",
    "DeviceError",
    "InvalidSampleError",
    "ModelFormatError",
    "OverloadedError",
    "PackRunnerError",
    "RequestTimeoutError",
    "RunnerClosedError",
    "RunnerNotStartedError",
]


class PackRunnerError(Exception):
    """Base class of every packrunner error."""


class ConfigError(PackRunnerError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class InvalidSampleError(PackRunnerError, ValueError):
    """A sample was rejected at submit time, before it was queued.

    Attributes:
        input_name: The offending input, when the problem is tied to one.
    """

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name


class OverloadedError(PackRunnerError):
    """The runner's queue is full (``max_queue_size``); retry later or shed load."""


class RunnerNotStartedError(PackRunnerError, RuntimeError):
    """The runner was used before ``start()`` (or before entering its context manager)."""


class RunnerClosedError(PackRunnerError):
    """The runner is closing or closed; the request was not (or will not be) executed."""


class RequestTimeoutError(PackRunnerError, TimeoutError):
    """A blocking ``execute(..., timeout=...)`` gave up; the sample is withdrawn if unpacked."""


class DeviceError(PackRunnerError):
    """The device failed while running the batch this request was in.

    The original exception is chained as ``__cause__``. Only the requests of that batch fail;
    the runner keeps serving.
    """


class ConversionError(PackRunnerError, ValueError):
    """An ONNX graph cannot be converted; the message says what was looked for and not found."""


class ModelFormatError(PackRunnerError, ValueError):
    """A checkpoint, config or weight mapping does not describe a supported model."""
