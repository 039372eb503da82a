"""The device adapter: validate samples, encode batches into feeds, know how outputs decode.

:class:`BatchFeeder` is derived once from the devices' specs and the runner config: it refuses
devices that do not fit, validates each caller's sample (:meth:`BatchFeeder.prepare`, on the
caller's thread before the sample is queued, so a bad sample is refused with a precise message
and never reaches, or poisons, a batch) and builds the fixed-shape feeds of a packed batch in
the device's dtypes (:meth:`BatchFeeder.feeds`). The runner, offline runs and the benchmark
peers all use it, so every path validates and encodes the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner.config import PackAlgorithm, RunnerConfig
from packrunner.devices.base import (
    BatchShape,
    Device,
    OutputLayout,
    OutputSpec,
    ShapeSet,
    TensorSpec,
)
from packrunner.errors import ConfigError, DeviceError, InvalidSampleError, short_repr
from packrunner.packing import PackPlan, build_feeds, unpack_outputs

__all__ = ["BatchFeeder", "PreparedSample", "SampleSchema"]

Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
_INT32_MAX = int(np.iinfo(np.int32).max)
_INT64_MAX = int(np.iinfo(np.int64).max)
_NAMES_SHOWN = 5  # unknown input names listed in an error message


@dataclass(frozen=True, slots=True)
class PreparedSample:
    """A validated sample: its length and its token arrays as contiguous int32."""

    length: int
    tokens: dict[str, Int32Array]
    positions: Int32Array | None


@dataclass(frozen=True, slots=True)
class SampleSchema:
    """Which names a sample may carry and the limits its values must respect.

    Attributes:
        dynamic_input: The input whose length defines the sample's length (required).
        token_inputs: Every per-token input fed to the device from the sample, including
            ``dynamic_input``; missing ones default to zeros if listed in ``zero_default``.
        zero_default: Token inputs that default to zeros (``token_type_ids``).
        position_input: Optional per-token position ids (default 0..L-1).
        mask_input: Optional 1-D mask, which must be all ones if given.
        seq_len: Longest sample accepted.
        value_limits: Per input name, the exclusive upper bound of its values (vocabularies).
        known_inputs: Every name a sample may carry (derived).
    """

    dynamic_input: str
    token_inputs: tuple[str, ...]
    zero_default: frozenset[str]
    position_input: str | None
    mask_input: str | None
    seq_len: int
    value_limits: Mapping[str, int]
    known_inputs: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        known = {*self.token_inputs}
        known.update(name for name in (self.position_input, self.mask_input) if name)
        object.__setattr__(self, "known_inputs", frozenset(known))

    def prepare(self, sample: object) -> PreparedSample:
        """Validate ``sample`` and return private int32 copies of its arrays.

        Every array is first copied into native-endian integers (so later changes to the
        caller's array cannot reach the runner, and the checks see exactly the values that
        will be sent), then checked.

        Raises:
            InvalidSampleError: With a message naming the input and what is wrong with it; any
                exception raised while reading the sample is chained as its ``__cause__``.
        """
        try:
            return self._prepare(sample)
        except InvalidSampleError:
            raise
        except Exception as exc:  # a sample whose mapping, __array__, __len__... raises
            raise InvalidSampleError(
                f"the sample could not be read: {type(exc).__name__}: {short_repr(exc)}"
            ) from exc

    def _prepare(self, sample: object) -> PreparedSample:
        # The dict check first: it is the common case and much cheaper than the ABC check.
        if not isinstance(sample, dict) and not isinstance(sample, Mapping):
            raise InvalidSampleError(
                f"a sample must be a mapping of input name to 1-D integer array, "
                f"got {_type_name(sample)}"
            )
        known = self.known_inputs
        unknown = [name for name in sample if name not in known]
        if unknown:
            shown = ", ".join(short_repr(name) for name in unknown[:_NAMES_SHOWN])
            more = f" and {len(unknown) - _NAMES_SHOWN} more" if len(unknown) > _NAMES_SHOWN else ""
            raise InvalidSampleError(
                f"unknown input name(s) {shown}{more}; this runner accepts {sorted(known)}",
                input_name=short_repr(unknown[0]),
            )
        if self.dynamic_input not in sample:
            raise InvalidSampleError(
                f"missing required input {self.dynamic_input!r}", input_name=self.dynamic_input
            )
        dynamic = self._as_ids(self.dynamic_input, sample[self.dynamic_input])
        length = len(dynamic)
        if length == 0:
            raise InvalidSampleError(
                f"input {self.dynamic_input!r} is empty; a sample needs at least one token",
                input_name=self.dynamic_input,
            )
        if length > self.seq_len:
            raise InvalidSampleError(
                f"input {self.dynamic_input!r} has {length} tokens, more than seq_len="
                f"{self.seq_len}; truncate or split it before submitting",
                input_name=self.dynamic_input,
            )
        tokens = {self.dynamic_input: self._check_values(self.dynamic_input, dynamic)}
        for name in self.token_inputs:
            if name == self.dynamic_input:
                continue
            if name in sample:
                array = self._as_ids(name, sample[name], length)
                tokens[name] = self._check_values(name, array)
            elif name in self.zero_default:
                tokens[name] = np.zeros(length, dtype=np.int32)
            else:
                raise InvalidSampleError(f"missing required input {name!r}", input_name=name)
        positions = None
        if self.position_input is not None and self.position_input in sample:
            positions = self._check_values(
                self.position_input,
                self._as_ids(self.position_input, sample[self.position_input], length),
            )
        if self.mask_input is not None and self.mask_input in sample:
            mask = self._as_ids(self.mask_input, sample[self.mask_input], length)
            if not bool((mask == 1).all()):
                raise InvalidSampleError(
                    f"input {self.mask_input!r} must be all ones for an unpadded sample "
                    "(send only the valid tokens; the runner builds the packed mask)",
                    input_name=self.mask_input,
                )
        return PreparedSample(length, tokens, positions)

    def _as_ids(self, name: str, value: object, length: int | None = None) -> Int64Array:
        """The runner's own native int64 copy of one input (checked for kind and shape only)."""
        if isinstance(value, np.ma.MaskedArray):
            # Masked entries have no value to send; filling them with an arbitrary one would
            # send data the caller hid. Unmasked arrays are read as their plain values.
            if bool(np.ma.getmaskarray(value).any()):
                raise InvalidSampleError(
                    f"input {name!r} is a masked array with masked values; send only valid "
                    "tokens (or fill them, e.g. numpy.ma.filled, before submitting)",
                    input_name=name,
                )
            value = np.ma.getdata(value)
        if isinstance(value, np.ndarray):
            # The plain ndarray over the same memory: a subclass's own methods (__len__,
            # __getitem__, __array__...) never run; its values are read as they are stored.
            array: npt.NDArray[Any] = np.ndarray.view(value, np.ndarray)
        elif isinstance(value, list | tuple):
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise InvalidSampleError(
                    f"input {name!r} is not a 1-D integer array: {short_repr(exc)}",
                    input_name=name,
                ) from exc
        else:
            raise InvalidSampleError(
                f"input {name!r} must be a numpy array or a list of ints, got {_type_name(value)}",
                input_name=name,
            )
        kind = array.dtype.kind
        if kind not in "iu" and not (array.size == 0 and kind == "f"):
            raise InvalidSampleError(
                f"input {name!r} must have an integer dtype, got {array.dtype}", input_name=name
            )
        if array.ndim != 1:
            raise InvalidSampleError(
                f"input {name!r} must be 1-D (one unpadded sample), got shape {array.shape}",
                input_name=name,
            )
        if length is not None and len(array) != length:
            raise InvalidSampleError(
                f"input {name!r} has length {len(array)} but {self.dynamic_input!r} has {length}",
                input_name=name,
            )
        if kind == "u" and array.dtype.itemsize == 8 and array.size:
            # The one integer dtype int64 cannot hold exactly: refuse its huge values first.
            high = int(array.max())
            if high > _INT64_MAX:
                raise InvalidSampleError(
                    f"input {name!r} has value {high}, beyond any vocabulary", input_name=name
                )
        # One copy, native byte order, exact for every integer dtype left: the caller can no
        # longer change what is checked and sent.
        return np.array(array, dtype=np.int64, order="C", copy=True)

    def _check_values(self, name: str, values: Int64Array) -> Int32Array:
        """Range-check the runner's own copy; return it as the int32 that will be sent."""
        limit = self.value_limits.get(name, _INT32_MAX + 1)
        low, high = int(values.min()), int(values.max())
        if low < 0:
            raise InvalidSampleError(
                f"input {name!r} has a negative value ({low})", input_name=name
            )
        if high >= limit:
            raise InvalidSampleError(
                f"input {name!r} has value {high}, must be < {limit}", input_name=name
            )
        return values.astype(np.int32)  # exact: every value is in [0, limit <= 2**31)


@dataclass(slots=True)
class _DeviceIO:
    """What the runner feeds a device, derived once from the device's specs."""

    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, OutputSpec]
    token_inputs: tuple[str, ...]
    position_input: str | None
    mask_input: str | None
    unpack_info_input: str | None
    shapes: ShapeSet
    casts: dict[str, np.dtype[Any]] = field(default_factory=dict)


class BatchFeeder:
    """What a runner feeds its devices: sample validation and fixed-shape feed building.

    Derived once from the devices' specs and the config (and refusing devices that do not fit
    them). PackRunner uses one; offline runs and benchmarks that drive a device directly use
    one too, so every path builds exactly the same feeds.

    Args:
        devices: One device, or several identical ones.
        config: The runner configuration (its algorithm decides which inputs are required).

    Raises:
        ConfigError: The devices do not fit the config.
    """

    def __init__(self, devices: Device | Sequence[Device], config: RunnerConfig) -> None:
        devices = (devices,) if isinstance(devices, Device) else tuple(devices)
        self.config = config
        self._io = _describe_devices(devices, config)
        self._schema = _schema_for(self._io, config, devices[0].input_value_limits)

    @property
    def outputs(self) -> Mapping[str, OutputSpec]:
        """The devices' outputs and their layouts."""
        return self._io.outputs

    @property
    def shapes(self) -> ShapeSet:
        """The batch shapes the devices run."""
        return self._io.shapes

    def shape_of(self, plan: PackPlan) -> BatchShape:
        """``(rows, width)`` of a plan's batch: its own, or the config's."""
        if plan.shape is not None:
            return plan.shape
        return self.config.batch_size, self.config.seq_len

    def prepare(self, sample: object) -> PreparedSample:
        """Validate one sample (raises :class:`~packrunner.InvalidSampleError`)."""
        return self._schema.prepare(sample)

    def feeds(
        self, plan: PackPlan, samples: Sequence[PreparedSample]
    ) -> dict[str, npt.NDArray[Any]]:
        """The device feeds for ``samples`` (in the plan's slot order), in the device dtypes."""
        io, config = self._io, self.config
        rows, width = self.shape_of(plan)
        token_inputs = {name: [s.tokens[name] for s in samples] for name in io.token_inputs}
        positions = None
        if io.position_input is not None and any(s.positions is not None for s in samples):
            positions = [
                s.positions if s.positions is not None else np.arange(s.length, dtype=np.int32)
                for s in samples
            ]
        feeds: dict[str, npt.NDArray[Any]] = dict(
            build_feeds(
                plan,
                token_inputs,
                batch_size=rows,
                seq_len=width,
                position_input=io.position_input,
                position_values=positions,
                mask_input=io.mask_input,
                unpack_info_input=io.unpack_info_input,
                max_valid_num=config.max_valid_num,
            )
        )
        for name, dtype in io.casts.items():
            feeds[name] = feeds[name].astype(dtype)
        return feeds

    def results(self, plan: PackPlan, outputs: object) -> list[dict[str, npt.NDArray[Any]]]:
        """Check one batch's device outputs against the output specs, then cut them per sample.

        Every declared output must be present, a numeric numpy array, and of exactly the shape
        its layout implies for this config (a transposed or extra-dimensional output would
        otherwise be cut up and delivered as results).

        Raises:
            DeviceError: Naming the output, its shape and the expected one.
        """
        if not isinstance(outputs, Mapping):
            raise DeviceError(
                f"device returned {_type_name(outputs)}, not a mapping of output name to array"
            )
        for name, spec in self._io.outputs.items():
            if name not in outputs:
                returned = ", ".join(short_repr(key) for key in list(outputs)[:_NAMES_SHOWN])
                raise DeviceError(f"device returned no output {name!r} (it returned {returned})")
            array = outputs[name]
            if not isinstance(array, np.ndarray):
                raise DeviceError(
                    f"device output {name!r} is a {_type_name(array)}, not a numpy array"
                )
            if array.dtype.kind not in "biufc":
                raise DeviceError(f"device output {name!r} has dtype {array.dtype}, not numbers")
            expected = self._expected_shape(spec, plan)
            fits = len(array.shape) == len(expected) and all(
                want is None or got == want for got, want in zip(array.shape, expected, strict=True)
            )
            if fits and spec.layout is OutputLayout.SEGMENTS and plan.num_samples:
                # Any segment count will do as long as this batch's segment ids index into it.
                fits = array.shape[1] >= int(plan.segment_ids.max())
            if not fits:
                shown = tuple("?" if d is None else d for d in expected)
                raise DeviceError(
                    f"device output {name!r} has shape {array.shape}, expected "
                    f"{shown} ({spec.layout.value} layout)"
                )
        return unpack_outputs(plan, outputs, self._io.outputs, seq_len=self.shape_of(plan)[1])

    def _expected_shape(self, spec: OutputSpec, plan: PackPlan) -> tuple[int | None, ...]:
        rows, tokens = self.shape_of(plan)
        slots = self.config.max_valid_num
        lead: tuple[int | None, ...]
        if spec.layout is OutputLayout.PACKED_TOKENS:
            lead = (rows, tokens)
        elif spec.layout is OutputLayout.SAMPLE_TOKENS:
            lead = (slots, tokens)
        elif spec.layout is OutputLayout.SEGMENTS:
            lead = (rows, None)
        elif spec.layout is OutputLayout.SAMPLES:
            lead = (slots,)
        else:
            lead = (rows,)
        return (*lead, *(None if d < 0 else d for d in spec.trailing_shape))


def _type_name(value: object) -> str:
    return type(value).__name__[:60]


def _describe_devices(devices: Sequence[Device], config: RunnerConfig) -> _DeviceIO:
    first = devices[0]
    inputs, outputs = dict(first.input_specs), dict(first.output_specs)
    for other in devices[1:]:
        if dict(other.input_specs) != inputs or dict(other.output_specs) != outputs:
            raise ConfigError("all devices of one runner must have identical inputs and outputs")
    shape = (config.batch_size, config.seq_len)
    special = {
        config.position_input_name,
        config.mask_input_name,
        config.unpack_info_input_name,
    }
    token_inputs: list[str] = []
    for name, spec in inputs.items():
        if name == config.unpack_info_input_name:
            if spec.shape != (config.max_valid_num,):
                raise ConfigError(
                    f"device input {name!r} has shape {spec.shape}, expected "
                    f"({config.max_valid_num},) for max_valid_num={config.max_valid_num}"
                )
        elif spec.shape != shape:
            raise ConfigError(
                f"device input {name!r} has shape {spec.shape}, but the runner config is "
                f"[batch_size={config.batch_size}, seq_len={config.seq_len}]"
            )
        if spec.dtype.kind not in "iu":
            raise ConfigError(f"device input {name!r} has dtype {spec.dtype}; expected integers")
        if name not in special:
            token_inputs.append(name)
    # After the input checks: they say precisely what is wrong with a mismatched device.
    shapes = first.shapes
    if any(other.shapes != shapes for other in devices[1:]):
        raise ConfigError("all devices of one runner must run the same batch shapes")
    if shape not in shapes or shapes.max_width != config.seq_len:
        raise ConfigError(
            f"the runner config's [batch_size={config.batch_size}, seq_len={config.seq_len}] "
            f"must be a shape the device runs, as wide as its widest ({shapes})"
        )
    if not shapes.is_single and config.algorithm is PackAlgorithm.STREAM:
        raise ConfigError("algorithm=stream packs one fixed stream; it cannot choose shapes")
    if config.dynamic_input_name not in inputs:
        raise ConfigError(
            f"dynamic_input_name={config.dynamic_input_name!r} is not a device input "
            f"(device inputs: {sorted(inputs)})"
        )
    if not outputs:
        raise ConfigError("the device declares no outputs")
    per_row = [name for name, spec in outputs.items() if spec.layout is OutputLayout.ROWS]
    if per_row and config.algorithm is not PackAlgorithm.PADDED:
        raise ConfigError(
            f"outputs {per_row} have one value per row, which only algorithm=padded can split"
        )
    algorithm = config.algorithm
    has = {
        "position": config.position_input_name in inputs,
        "mask": config.mask_input_name in inputs,
        "unpack_info": config.unpack_info_input_name in inputs,
    }
    if algorithm is PackAlgorithm.STREAM and not has["unpack_info"]:
        raise ConfigError(
            f"algorithm=stream needs a device input {config.unpack_info_input_name!r} "
            "(an unpack/repack model)"
        )
    if algorithm is not PackAlgorithm.STREAM and has["unpack_info"]:
        raise ConfigError(
            f"the device takes {config.unpack_info_input_name!r} (an unpack/repack model); "
            f"use algorithm=stream, not {algorithm.value}"
        )
    if algorithm not in (PackAlgorithm.PADDED, PackAlgorithm.STREAM) and not has["mask"]:
        raise ConfigError(
            f"algorithm={algorithm.value} packs several samples per row and needs the "
            f"segment-id mask input {config.mask_input_name!r}; the device has {sorted(inputs)}"
        )
    if algorithm is not PackAlgorithm.PADDED and not has["position"]:
        raise ConfigError(
            f"algorithm={algorithm.value} needs a {config.position_input_name!r} device input "
            "so positions restart at 0 for every packed sample; use algorithm=padded for a "
            "padded-only model"
        )
    casts = {name: spec.dtype for name, spec in inputs.items() if spec.dtype != np.dtype(np.int32)}
    return _DeviceIO(
        inputs=inputs,
        outputs=outputs,
        token_inputs=tuple(token_inputs),
        position_input=config.position_input_name if has["position"] else None,
        mask_input=config.mask_input_name if has["mask"] else None,
        unpack_info_input=config.unpack_info_input_name if has["unpack_info"] else None,
        shapes=shapes,
        casts=casts,
    )


def _schema_for(
    io: _DeviceIO, config: RunnerConfig, device_limits: Mapping[str, int]
) -> SampleSchema:
    # The device knows its tables (e.g. an ONNX model's embedding rows); the config may only
    # tighten them.
    limits = dict(device_limits)

    def tighten(name: str, bound: int) -> None:
        limits[name] = min(bound, limits.get(name, bound))

    tighten(config.token_type_input_name, config.type_vocab_size)
    if config.vocab_size is not None:
        tighten(config.dynamic_input_name, config.vocab_size)
    if io.position_input is not None:
        tighten(io.position_input, config.seq_len)
    return SampleSchema(
        dynamic_input=config.dynamic_input_name,
        token_inputs=io.token_inputs,
        zero_default=frozenset({config.token_type_input_name}),
        position_input=io.position_input,
        mask_input=config.mask_input_name,
        seq_len=config.seq_len,
        value_limits=limits,
    )
