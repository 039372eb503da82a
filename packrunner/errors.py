"""Exceptions raised by packrunner.

Every error a caller can see derives from :class:`PackRunnerError`::

    PackRunnerError
    ├── ConfigError (also ValueError)          a RunnerConfig field is out of range
    ├── InvalidSampleError (also ValueError)   a sample is rejected at submit time
    ├── OverloadedError                        the queue is at max_queue_size
    ├── RunnerNotStartedError (also RuntimeError)
    ├── RunnerClosedError                      the runner is closing or closed
    ├── RequestTimeoutError (also TimeoutError) the request's deadline (timeout=) passed
    ├── DeviceError                            the device failed a batch (raised, bad outputs)
    │   └── DeviceTimeoutError (also TimeoutError) a batch exceeded device_timeout_s
    ├── ConversionError (also ValueError)      packrunner.convert: an ONNX graph it cannot convert
    └── ModelFormatError (also ValueError)     packrunner.models: a checkpoint it cannot read
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConversionError",
    "DeviceError",
    "DeviceTimeoutError",
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


#: Longest message an :class:`InvalidSampleError` carries: samples come from untrusted clients,
#: and an error that echoes them must not grow with them.
MAX_SAMPLE_MESSAGE_CHARS = 500


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 15]}... [{len(text)} chars]"


def short_repr(value: object, limit: int = 60) -> str:
    """A bounded repr of untrusted data for error messages (never raises, never huge)."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__[:60]} with a failing repr>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class InvalidSampleError(PackRunnerError, ValueError):
    """A sample was rejected at submit time, before it was queued.

    Any failure to read a sample (an ``__array__`` or ``__len__`` that raises, a mapping whose
    iteration raises) is reported as this error with the original exception as ``__cause__``.
    The message is at most :data:`MAX_SAMPLE_MESSAGE_CHARS` long.

    Attributes:
        input_name: The offending input, when the problem is tied to one.
    """

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        super().__init__(_bounded(message, MAX_SAMPLE_MESSAGE_CHARS))
        self.input_name = None if input_name is None else _bounded(input_name, 100)


class OverloadedError(PackRunnerError):
    """The runner's queue is full (``max_queue_size``); retry later or shed load."""


class RunnerNotStartedError(PackRunnerError, RuntimeError):
    """The runner was used before ``start()`` (or before entering its context manager)."""


class RunnerClosedError(PackRunnerError):
    """The runner is closing or closed; the request was not (or will not be) executed."""


class RequestTimeoutError(PackRunnerError, TimeoutError):
    """The request's deadline (``timeout=`` of execute / execute_async / submit) passed.

    Before packing the sample is withdrawn (it takes no slot); after packing its result is
    discarded. The message says which.
    """


class DeviceError(PackRunnerError):
    """The device failed while running the batch this request was in.

    The original exception is chained as ``__cause__``. Only the requests of that batch fail
    (or, with ``RunnerConfig.check_finite``, only its samples with NaN/Inf outputs); the runner
    keeps serving. Also raised at submit when no working device is left.
    """


class DeviceTimeoutError(DeviceError, TimeoutError):
    """A batch ran longer than ``RunnerConfig.device_timeout_s``.

    Its worker thread is abandoned and a fresh device is opened when the device supports it
    (:meth:`~packrunner.Device.replica`).
    """


class ConversionError(PackRunnerError, ValueError):
    """An ONNX graph cannot be converted; the message says what was looked for and not found."""


class ModelFormatError(PackRunnerError, ValueError):
    """A checkpoint, config or weight mapping does not describe a supported model."""
