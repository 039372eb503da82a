"""PopRT's ``poprt.runtime`` PackRunner API on top of :class:`packrunner.PackRunner`.

Replace ``from poprt import runtime`` with::

    from packrunner.compat import poprt_runtime as runtime

and PackRunner code runs unchanged on an ONNX model::

    config = runtime.PackRunnerConfig(timeout_microseconds=15000, max_valid_num=40)
    config.algorithm = runtime.PackAlgorithm.first_fit
    config.enable_input_single_row_mode("attention_mask")
    runner = runtime.Runner("model.onnx", config)      # or the exported executable.popef
    out = {"start_logits": np.zeros(256, np.float16)}
    future = runner.execute_async({"input_ids": ids, "attention_mask": ones}, out)
    future.wait()                                        # out["start_logits"][:len(ids)] is set

What differs from PopRT (``docs/migration.md`` has the full list): errors are packrunner's typed
exceptions; an unset ``algorithm`` is PopRT's ``next_fit`` but ``PackAlgorithm.lookahead`` packs
better; ``max_valid_num=0`` means "no cap" (see :class:`PackRunnerConfig`); ``unpack_info`` is
computed by the runner, the caller's placeholder is only checked; misspelt config attributes
raise ``AttributeError`` instead of being ignored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import enum
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt
import onnx

from packrunner import config as _core_config
from packrunner.devices.base import OutputLayout, OutputSpec
from packrunner.devices.onnx import OnnxDevice
from packrunner.errors import (
    ConfigError,
    InvalidSampleError,
    RequestTimeoutError,
)
from packrunner.runner import PackRunner, Result
from packrunner.stats import RunnerStats

__all__ = ["Future", "PackAlgorithm", "PackRunnerConfig", "Runner"]


#: Output arrays the caller preallocates; the runner writes each sample's values into them.
OutDict = Mapping[str, npt.NDArray[Any]]

_DEFAULT_DYNAMIC_INPUT: Final = "input_ids"
_DEFAULT_UNPACK_INFO: Final = "unpack_info"
_DEFAULT_MASK: Final = "attention_mask"
_POSITION_INPUT: Final = "position_ids"
_TOKEN_TYPE_INPUT: Final = "token_type_ids"
_TOKEN_LAYOUTS: Final = frozenset({OutputLayout.PACKED_TOKENS, OutputLayout.SAMPLE_TOKENS})


class PackAlgorithm(enum.Enum):
    """PopRT's ``runtime.PackAlgorithm``, plus packrunner's ``lookahead``.

    Only used in single-row mode (packed models); across-rows models always pack end to end.

    Attributes:
        next_fit: PopRT's default: fill the current row, open the next when a sample does not
            fit. Also what an unset ``PackRunnerConfig.algorithm`` means.
        first_fit: Each sample goes into the first row with room; the batch closes at the
            first sample that fits nowhere.
        lookahead: packrunner's anchored best fit (not in PopRT): the oldest waiting sample
            anchors each row and the rest of the row is filled with the largest samples that
            still fit. Most samples per batch, and starvation-free.
    """

    next_fit = "next_fit"
    first_fit = "first_fit"
    lookahead = "lookahead"

    @property
    def core(self) -> _core_config.PackAlgorithm:
        """The :class:`packrunner.PackAlgorithm` this maps to."""
        return _core_config.PackAlgorithm(self.value)


# PopRT C++ knobs that have no Python binding here, with what to do instead.
_UNSUPPORTED_KNOBS: Final[dict[str, str]] = {
    "compile_batch_size": "packrunner reads the batch size from the model's input shape",
    "disable_data_across_rows": (
        "call config.enable_input_single_row_mode(mask_name) for packed models"
    ),
    "enable_padding_remove": "send unpadded samples (1-D arrays of the sample's own length)",
    "dynamic_group": "every per-token input is packed together with the dynamic input",
    "enable_prefetch_datastreams": "packrunner always prepares one batch ahead of the device",
    "device_wait_config": "packrunner has no device wait; devices are opened once at start",
}


class PackRunnerConfig:
    """PopRT's ``runtime.PackRunnerConfig``: how the runner packs samples.

    Every keyword is optional, as in PopRT. The object is checked when an attribute is set:
    an unknown or misspelt attribute (such as ``config.algorithom`` in one of Graphcore's own
    examples) raises ``AttributeError`` instead of being silently ignored.

    Args:
        timeout_microseconds: Dispatch a partly filled batch once its *oldest* waiting sample
            has waited this long. 0 (PopRT's default) dispatches whatever is queued as soon as
            the device is free.
        max_valid_num: Most samples in one batch. 0 (PopRT's default) means no explicit cap:
            for an unpack/repack model, the length of its ``unpack_info`` input (the only value
            such a model accepts); for a packed model, the most samples the batch can
            physically hold (``batch_size * seq_len``, one token each), or the number of
            segment slots of a per-segment output if the model has one. The token budget then
            decides.
        dynamic_input_name: The input whose length is the sample's length; ``""`` (PopRT's
            default) means ``"input_ids"``.
        unpack_info_input_name: Name of an unpack/repack model's ``unpack_info`` input; ``""``
            means ``"unpack_info"``.

    Attributes:
        algorithm: A :class:`PackAlgorithm` for single-row mode; default ``next_fit`` (PopRT's
            default). Ignored in across-rows mode, which always packs end to end.
        mask_name: The segment-id mask input set by :meth:`enable_input_single_row_mode`
            (read-only; ``""`` in across-rows mode).
        single_row_mode: Whether :meth:`enable_input_single_row_mode` was called (read-only).

    Raises:
        ConfigError: A value has the wrong type or is negative.
    """

    __slots__ = (
        "_algorithm",
        "_delimiter_num",
        "_dynamic_input_name",
        "_mask_name",
        "_max_valid_num",
        "_single_row_unpack_info_name",
        "_timeout_microseconds",
        "_unpack_info_input_name",
    )

    _algorithm: PackAlgorithm
    _delimiter_num: int
    _dynamic_input_name: str
    _mask_name: str
    _max_valid_num: int
    _single_row_unpack_info_name: str
    _timeout_microseconds: int
    _unpack_info_input_name: str

    def __init__(
        self,
        timeout_microseconds: int = 0,
        max_valid_num: int = 0,
        dynamic_input_name: str = "",
        unpack_info_input_name: str = "",
    ) -> None:
        self.timeout_microseconds = timeout_microseconds
        self.max_valid_num = max_valid_num
        self.dynamic_input_name = dynamic_input_name
        self.unpack_info_input_name = unpack_info_input_name
        self.algorithm = PackAlgorithm.next_fit
        object.__setattr__(self, "_mask_name", "")
        object.__setattr__(self, "_single_row_unpack_info_name", "")
        object.__setattr__(self, "_delimiter_num", 0)

    # -------------------------------------------------------------------- guarded attributes

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SETTABLE:
            object.__setattr__(self, name, value)  # runs the property's validating setter
            return
        if name in _READ_ONLY:
            raise AttributeError(
                f"PackRunnerConfig.{name} is read-only; set it with "
                "config.enable_input_single_row_mode(mask_name, unpack_info_name, delimiter_num)"
            )
        raise AttributeError(_unknown_attribute_message(name))

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup failed: explain instead of a bare AttributeError.
        raise AttributeError(_unknown_attribute_message(name))

    @property
    def timeout_microseconds(self) -> int:
        """Microseconds the oldest waiting sample may wait before a partial batch goes."""
        return self._timeout_microseconds

    @timeout_microseconds.setter
    def timeout_microseconds(self, value: int) -> None:
        object.__setattr__(self, "_timeout_microseconds", _non_negative_int(value, "timeout"))

    @property
    def max_valid_num(self) -> int:
        """Most samples per batch; 0 means no explicit cap (see the class docstring)."""
        return self._max_valid_num

    @max_valid_num.setter
    def max_valid_num(self, value: int) -> None:
        object.__setattr__(self, "_max_valid_num", _non_negative_int(value, "max_valid_num"))

    @property
    def dynamic_input_name(self) -> str:
        """The input whose length is the sample's length (``""``: ``"input_ids"``)."""
        return self._dynamic_input_name

    @dynamic_input_name.setter
    def dynamic_input_name(self, value: str) -> None:
        object.__setattr__(self, "_dynamic_input_name", _name(value, "dynamic_input_name"))

    @property
    def unpack_info_input_name(self) -> str:
        """An unpack/repack model's ``unpack_info`` input (``""``: ``"unpack_info"``)."""
        return self._unpack_info_input_name

    @unpack_info_input_name.setter
    def unpack_info_input_name(self, value: str) -> None:
        object.__setattr__(self, "_unpack_info_input_name", _name(value, "unpack_info_input_name"))

    @property
    def algorithm(self) -> PackAlgorithm:
        """Single-row packing algorithm (default ``PackAlgorithm.next_fit``, as in PopRT)."""
        return self._algorithm

    @algorithm.setter
    def algorithm(self, value: PackAlgorithm | str) -> None:
        if isinstance(value, str) and not isinstance(value, PackAlgorithm):
            try:
                value = PackAlgorithm(value)
            except ValueError:
                pass
        if not isinstance(value, PackAlgorithm):
            choices = ", ".join(f"PackAlgorithm.{a.name}" for a in PackAlgorithm)
            raise ConfigError(f"algorithm must be one of {choices}, got {value!r}")
        object.__setattr__(self, "_algorithm", value)

    @property
    def mask_name(self) -> str:
        """The segment-id mask input of single-row mode (``""`` in across-rows mode)."""
        return self._mask_name

    @property
    def single_row_mode(self) -> bool:
        """Whether samples stay within one row (packed models)."""
        return bool(self._mask_name)

    def enable_input_single_row_mode(
        self, mask_name: str, unpack_info_name: str = "", delimiter_num: int = 0
    ) -> None:
        """Pack whole samples into rows and mark them in the ``mask_name`` input (segment ids).

        This is the mode for packed models (:attr:`packrunner.InputForm.PACKED`). Without it the
        runner packs across rows, which needs an unpack/repack model.

        Args:
            mask_name: The model's attention-mask input, which receives per-token segment ids
                (1, 2, ... within a row, 0 on padding).
            unpack_info_name: A feed name to accept and ignore (PopRT's DeBERTa example passes
                an ``unpack_info`` placeholder in this mode). The model itself must not take it.
            delimiter_num: Zero tokens between samples of a row; only 0 is supported.

        Raises:
            ConfigError: ``mask_name`` is empty or a name is not a string.
            NotImplementedError: ``delimiter_num`` is not 0.
        """
        mask = _name(mask_name, "mask_name")
        if not mask:
            raise ConfigError("enable_input_single_row_mode needs the attention-mask input name")
        unpack = _name(unpack_info_name, "unpack_info_name")
        delimiters = _non_negative_int(delimiter_num, "delimiter_num")
        if delimiters:
            raise NotImplementedError(
                f"delimiter_num={delimiters} (zero tokens between packed samples, PopRT's "
                "DeBERTa mode) is not supported by packrunner: samples are packed back to back "
                "and kept apart by the segment-id mask; use delimiter_num=0"
            )
        object.__setattr__(self, "_mask_name", mask)
        object.__setattr__(self, "_single_row_unpack_info_name", unpack)
        object.__setattr__(self, "_delimiter_num", delimiters)

    def __repr__(self) -> str:
        mode = f"single_row_mode({self._mask_name!r})" if self._mask_name else "across_rows"
        return (
            f"PackRunnerConfig(timeout_microseconds={self._timeout_microseconds}, "
            f"max_valid_num={self._max_valid_num}, "
            f"dynamic_input_name={self._dynamic_input_name!r}, "
            f"algorithm=PackAlgorithm.{self._algorithm.name}, {mode})"
        )


_SETTABLE: Final = frozenset(
    {
        "timeout_microseconds",
        "max_valid_num",
        "dynamic_input_name",
        "unpack_info_input_name",
        "algorithm",
    }
)
_READ_ONLY: Final = frozenset({"mask_name", "single_row_mode"})


def _unknown_attribute_message(name: str) -> str:
    message = f"PackRunnerConfig has no attribute {name!r}"
    if name in _UNSUPPORTED_KNOBS:
        return (
            f"{message} (a PopRT C++ option packrunner does not need: {_UNSUPPORTED_KNOBS[name]})"
        )
    public = sorted(_SETTABLE | _READ_ONLY | {"enable_input_single_row_mode"})
    close = difflib.get_close_matches(name, public, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{message}{hint} Settable attributes: {sorted(_SETTABLE)}"


def _non_negative_int(value: object, what: str) -> int:
    # bool is an int subclass; True as a timeout is a bug, not a 1.
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ConfigError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ConfigError(f"{what} must be >= 0, got {value}")
    return int(value)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value


# ------------------------------------------------------------------------------------- Future


class Future:
    """The handle :meth:`Runner.execute_async` returns (PopRT's future).

    ``wait()`` returns once the sample's outputs are in the caller's ``out_dict``, or raises the
    packrunner error that failed it (:class:`~packrunner.InvalidSampleError`,
    :class:`~packrunner.DeviceError`, :class:`~packrunner.RunnerClosedError`, ...).
    """

    __slots__ = ("_future", "_request")

    def __init__(
        self,
        future: concurrent.futures.Future[None],
        request: concurrent.futures.Future[Result] | None = None,
    ) -> None:
        self._future = future
        self._request = request  # the engine's future; cancelling it withdraws the sample

    def wait(self, timeout: float | None = None) -> None:
        """Block until the outputs are written.

        Args:
            timeout: Seconds to wait; None (PopRT's only behaviour) waits for ever. When it
                expires the sample is withdrawn if it was not packed yet, and the ``out_dict``
                contents are unspecified.

        Raises:
            RequestTimeoutError: ``timeout`` expired (now or in an earlier ``wait``).
            PackRunnerError: Whatever failed the sample (typed, see the class docstring).
        """
        if self._future.cancelled():
            raise RequestTimeoutError("an earlier wait() timed out and withdrew this sample")
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():
                # Finished meanwhile (or its own error is a TimeoutError): report the outcome.
                self._future.result()
                return
            # Cancelling the engine's future withdraws the sample if it is still queued.
            if self._request is not None:
                self._request.cancel()
            if self._future.cancel() or self._future.cancelled():
                raise RequestTimeoutError(
                    f"no result within {timeout} s; the sample was withdrawn"
                ) from None
            self._future.result()  # finished meanwhile: report its outcome

    def done(self) -> bool:
        """True once ``wait()`` would return (or raise) without blocking."""
        return self._future.done()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<poprt_runtime.Future {state}>"


# ------------------------------------------------------------------------------------- Runner


@dataclass(frozen=True, slots=True)
class _OutputTarget:
    """One caller-preallocated output array and how the runner's result fills it."""

    name: str
    array: npt.NDArray[Any]
    per_token: bool


def _write_outputs(targets: tuple[_OutputTarget, ...], result: Result) -> None:
    for target in targets:
        value = result[target.name]
        if target.per_token:
            length = value.shape[0]
            # Assignment casts to the caller's dtype (e.g. rounds to float16).
            target.array[:length] = value
            target.array[length:] = 0
        else:
            target.array[...] = value


class _Resources:
    """The threads a Runner owns, closable from ``close()``, a finalizer or interpreter exit.

    Kept apart from :class:`Runner` so that the ``weakref.finalize`` callback holds no
    reference to the Runner itself (else the Runner could never be collected).
    """

    def __init__(self, core: PackRunner) -> None:
        self.core = core

    def submit(self, sample: dict[str, Any], targets: tuple[_OutputTarget, ...]) -> Future:
        # PackRunner.submit queues the sample now (bad input raises here) and resolves on the
        # engine thread; the callback copies the outputs into the caller's arrays right there,
        # so no extra thread or hop is involved.
        inner = self.core.submit(sample)
        written: concurrent.futures.Future[None] = concurrent.futures.Future()

        def write(done: concurrent.futures.Future[Result]) -> None:
            if done.cancelled():
                written.cancel()
                return
            error = done.exception()
            try:
                if error is None:
                    _write_outputs(targets, done.result())
            except Exception as exc:  # a result that does not fit out_dict: this sample only
                error = exc
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if error is None:
                    written.set_result(None)
                else:
                    written.set_exception(error)

        inner.add_done_callback(write)
        return Future(written, inner)

    def close(self) -> None:
        self.core.close(drain=True)  # runs every accepted sample and delivers its outputs


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a PopRT config maps onto a PackRunner for one model."""

    runner_config: _core_config.RunnerConfig
    accepted: frozenset[str]
    ignored: frozenset[str]
    unpack_info_name: str | None  # checked and dropped in across-rows mode


class Runner:
    """PopRT's ``runtime.Runner`` with a ``PackRunnerConfig``: a started packrunner engine.

    Builds a :class:`packrunner.PackRunner` over an :class:`~packrunner.devices.onnx.OnnxDevice`
    for ``model_path`` and starts it. Single-row mode (``enable_input_single_row_mode``) needs
    a packed model (segment-id mask and ``position_ids`` inputs); otherwise the model
    must be an unpack/repack model (it takes ``unpack_info``) and samples are packed across rows.

    Args:
        model_path: An ONNX model at a fixed shape, or the ``executable.popef`` written by
            ``packrunner.compat.backend.get_session(..., export_popef=True)`` (an ONNX file).
        config: The packing configuration (default ``PackRunnerConfig()``). It is read once:
            later changes to it do not affect this runner.
        intra_op_num_threads: onnxruntime threads (packrunner extension; default every core).
        max_queue_size: Most samples waiting to be packed before ``OverloadedError``
            (packrunner extension; default 8192).

    Raises:
        ConfigError: The model cannot run in the configured mode (message says why).
        DeviceError: onnxruntime could not load the model.
        TypeError: ``config`` is not a ``PackRunnerConfig`` (e.g. a PopRT ``RuntimeConfig``).

    Example:
        >>> runner = Runner(model_path, config)                       # doctest: +SKIP
        >>> out = {"start_logits": np.zeros(256, np.float16)}          # doctest: +SKIP
        >>> runner.execute({"input_ids": ids}, out)                    # doctest: +SKIP
        >>> runner.close()                                             # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        config: PackRunnerConfig | None = None,
        *,
        intra_op_num_threads: int | None = None,
        max_queue_size: int | None = None,
    ) -> None:
        if config is None:
            config = PackRunnerConfig()
        if not isinstance(config, PackRunnerConfig):
            raise TypeError(
                f"config must be a PackRunnerConfig, got {type(config).__name__}; packrunner "
                "only provides PopRT's PackRunner (fixed-batch ModelRunner configs are not "
                "supported: use packrunner.compat.backend.get_session for whole batches)"
            )
        model = _load_model(Path(model_path))
        device = OnnxDevice(model_path, intra_op_num_threads=intra_op_num_threads)
        plan = _plan(config, device, model, max_queue_size)
        self._device = device
        self._plan = plan
        self._dynamic_input = plan.runner_config.dynamic_input_name
        core = PackRunner(device, plan.runner_config)
        core.start()
        self._resources = _Resources(core)
        # Closes the runner when it is garbage collected or at interpreter exit, so its threads
        # never outlive it even if the caller forgets close() (PopRT's destructor did this).
        self._finalizer = weakref.finalize(self, self._resources.close)

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def pack_runner(self) -> PackRunner:
        """The underlying :class:`packrunner.PackRunner` (for ``stats()``, its config, ...)."""
        return self._resources.core

    @property
    def runner_config(self) -> _core_config.RunnerConfig:
        """The packrunner configuration the PopRT config was translated into."""
        return self._plan.runner_config

    def stats(self) -> RunnerStats:
        """A snapshot of the engine's counters (packrunner extension)."""
        return self._resources.core.stats()

    def close(self) -> None:
        """Finish every accepted sample, deliver its outputs, and stop all threads. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests

    def execute(self, feeds: Mapping[str, npt.ArrayLike], out_dict: OutDict) -> None:
        """Run one sample and block until its outputs are written into ``out_dict``.

        Thread-safe: any number of threads may call it at once (their samples share batches).

        Args:
            feeds: ONE unpadded sample: input name -> 1-D integer array of the sample's length
                (``input_ids``; optional ``token_type_ids``, ``position_ids``, a 1-D
                ``attention_mask`` of ones, and PopRT's ``unpack_info`` placeholder).
            out_dict: Output name -> caller-preallocated float array (any float dtype) of at
                least the sample's length for per-token outputs, e.g. ``np.zeros(256,
                np.float16)``. Receives the sample's values, zeros after its length. Outputs
                not named here are not returned.

        Raises:
            InvalidSampleError: Bad feeds or out_dict (nothing was queued).
            OverloadedError: The queue is full.
            RunnerClosedError: The runner is closed.
            DeviceError: The device failed on this sample's batch.
        """
        sample, targets = self._prepare(feeds, out_dict)
        _write_outputs(targets, self._resources.core.execute(sample))

    def execute_async(self, feeds: Mapping[str, npt.ArrayLike], out_dict: OutDict) -> Future:
        """Submit one sample; ``future.wait()`` returns once ``out_dict`` is written.

        Does not block and starts no thread per call. Arguments as :meth:`execute`. Bad feeds
        or out_dict raise at once; errors found while the sample is in the runner (values out
        of the model's vocabulary included); a device failure is raised by ``future.wait()``.

        Raises:
            InvalidSampleError: Bad feeds or out_dict (nothing was queued).
            RunnerClosedError: The runner is closed.
        """
        sample, targets = self._prepare(feeds, out_dict)
        return self._resources.submit(sample, targets)

    def _prepare(
        self, feeds: Mapping[str, npt.ArrayLike], out_dict: OutDict
    ) -> tuple[dict[str, Any], tuple[_OutputTarget, ...]]:
        """Check feeds and out_dict on the caller's thread; strip PopRT-only placeholders."""
        if not isinstance(feeds, Mapping):
            raise InvalidSampleError(
                f"feeds must be a mapping of input name to array, got {type(feeds).__name__}"
            )
        plan = self._plan
        unknown = sorted(str(name) for name in feeds if name not in plan.accepted)
        if unknown:
            raise InvalidSampleError(
                f"unknown input name(s) {unknown}; this runner accepts {sorted(plan.accepted)}",
                input_name=unknown[0],
            )
        sample = {name: value for name, value in feeds.items() if name not in plan.ignored}
        if plan.unpack_info_name is not None and plan.unpack_info_name in feeds:
            self._check_unpack_info(feeds[plan.unpack_info_name])
        ids = sample.get(self._dynamic_input)
        if ids is None:
            raise InvalidSampleError(
                f"missing required input {self._dynamic_input!r}", input_name=self._dynamic_input
            )
        shape = np.shape(ids)
        if len(shape) != 1 or not 1 <= shape[0] <= plan.runner_config.seq_len:
            raise InvalidSampleError(
                f"input {self._dynamic_input!r} must be 1-D with 1..{plan.runner_config.seq_len}"
                f" tokens (one unpadded sample), got shape {shape}",
                input_name=self._dynamic_input,
            )
        return sample, self._targets(out_dict, shape[0])

    def _check_unpack_info(self, value: npt.ArrayLike) -> None:
        # PopRT made across-rows callers pass a placeholder; the runner computes the real one.
        name = self._plan.unpack_info_name
        expected = self._plan.runner_config.max_valid_num
        array = np.asarray(value)
        if array.dtype.kind not in "iu" or array.shape != (expected,):
            raise InvalidSampleError(
                f"input {name!r} must be a 1-D integer array of length max_valid_num={expected}"
                f" (a placeholder: the runner computes unpack_info itself), got "
                f"{array.dtype} {array.shape}",
                input_name=name,
            )

    def _targets(self, out_dict: OutDict, length: int) -> tuple[_OutputTarget, ...]:
        if not isinstance(out_dict, Mapping):
            raise InvalidSampleError(
                f"out_dict must be a mapping of output name to a preallocated numpy array, "
                f"got {type(out_dict).__name__}"
            )
        specs = self._device.output_specs
        targets: list[_OutputTarget] = []
        for name, array in out_dict.items():
            spec = specs.get(name)
            if spec is None:
                raise InvalidSampleError(
                    f"out_dict names unknown output {name!r}; the model's outputs are "
                    f"{sorted(specs)}",
                    input_name=name,
                )
            targets.append(_output_target(name, array, spec, length))
        return tuple(targets)


def _output_target(name: str, array: object, spec: OutputSpec, length: int) -> _OutputTarget:
    if not isinstance(array, np.ndarray):
        raise InvalidSampleError(
            f"out_dict[{name!r}] must be a preallocated numpy array, got {type(array).__name__}",
            input_name=name,
        )
    if array.dtype.kind != "f":
        raise InvalidSampleError(
            f"out_dict[{name!r}] must have a float dtype, got {array.dtype}", input_name=name
        )
    if not array.flags.writeable:
        raise InvalidSampleError(f"out_dict[{name!r}] is read-only", input_name=name)
    per_token = spec.layout in _TOKEN_LAYOUTS
    trailing = spec.trailing_shape
    shape_ok = _matches(array.shape[1:] if per_token else array.shape, trailing)
    if per_token:
        shape_ok = shape_ok and array.ndim == 1 + len(trailing) and array.shape[0] >= length
        wanted = f"({length} or more{''.join(f', {d}' for d in trailing)})"
    else:
        wanted = str(trailing)
    if not shape_ok:
        raise InvalidSampleError(
            f"out_dict[{name!r}] has shape {array.shape}; this sample needs {wanted}",
            input_name=name,
        )
    return _OutputTarget(name, array, per_token)


def _matches(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # -1 marks a dim the model leaves symbolic: anything fits.
    return len(shape) == len(expected) and all(
        e in (-1, s) for s, e in zip(shape, expected, strict=True)
    )


# ------------------------------------------------------------------ config -> RunnerConfig


def _load_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ConfigError(f"model_path {str(path)!r} is not a file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ConfigError(
            f"{str(path)!r} is not an ONNX model ({exc}); packrunner runs ONNX models: pass the "
            ".onnx file (a PopRT-compiled PopEF cannot be run, export it again with "
            "packrunner.compat.backend.get_session(..., export_popef=True))"
        ) from exc


def _plan(
    config: PackRunnerConfig,
    device: OnnxDevice,
    model: onnx.ModelProto,
    max_queue_size: int | None,
) -> _Plan:
    inputs = device.input_specs
    unpack_name = config.unpack_info_input_name or _DEFAULT_UNPACK_INFO
    dynamic = config.dynamic_input_name or _DEFAULT_DYNAMIC_INPUT
    takes_unpack_info = unpack_name in inputs
    limits = device.input_value_limits
    ignored: set[str] = set()
    options: dict[str, Any] = {
        "batch_size": device.batch_size,
        "seq_len": device.seq_len,
        "timeout_us": config.timeout_microseconds,
        "dynamic_input_name": dynamic,
        "unpack_info_input_name": unpack_name,
        "vocab_size": limits.get(dynamic),
        "type_vocab_size": limits.get(_TOKEN_TYPE_INPUT, 2),
    }
    if max_queue_size is not None:
        options["max_queue_size"] = max_queue_size
    if config.single_row_mode:
        if takes_unpack_info:
            raise ConfigError(
                f"single-row mode packs whole samples into rows for a packed model, "
                f"but this model takes {unpack_name!r} (an unpack/repack model): drop "
                "enable_input_single_row_mode() to pack across rows, or use the packed model"
            )
        options["algorithm"] = config.algorithm.core
        options["mask_input_name"] = config.mask_name
        options["max_valid_num"] = config.max_valid_num or _no_cap(device, model)
        if config._single_row_unpack_info_name:
            ignored.add(config._single_row_unpack_info_name)
        ignored.add(unpack_name)  # PopRT placeholders: meaningless for this model
        unpack_info_name = None
    else:
        if not takes_unpack_info:
            raise ConfigError(
                f"this model has no {unpack_name!r} input, so it cannot pack samples across "
                "rows (PopRT's default mode); for a packed model call "
                "config.enable_input_single_row_mode('attention_mask') first"
            )
        options["algorithm"] = _core_config.InputForm.UNPACK_REPACK.default_algorithm
        options["max_valid_num"] = config.max_valid_num or inputs[unpack_name].shape[0]
        ignored.add(unpack_name)
        unpack_info_name = unpack_name
    runner_config = _core_config.RunnerConfig(**options)
    # What PackRunner's submit path accepts (see runner._schema_for), plus the placeholders.
    special = {_POSITION_INPUT, runner_config.mask_input_name, unpack_name}
    accepted = {name for name in inputs if name not in special}
    accepted.add(runner_config.mask_input_name)
    if _POSITION_INPUT in inputs:
        accepted.add(_POSITION_INPUT)
    return _Plan(runner_config, frozenset(accepted | ignored), frozenset(ignored), unpack_info_name)


def _no_cap(device: OnnxDevice, model: onnx.ModelProto) -> int:
    """max_valid_num for "no explicit cap": what the batch and the model's outputs can hold."""
    cap = device.batch_size * device.seq_len  # every sample has at least one token
    declared = {value.name: value for value in model.graph.output}
    for name, spec in device.output_specs.items():
        if spec.layout is OutputLayout.SEGMENTS and name in declared:
            # [batch, segments, ...]: more samples than segment slots per row would be lost.
            dims = declared[name].type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[1].dim_value > 0:
                cap = min(cap, dims[1].dim_value)
    return cap
