"""Submit-time validation: turn a caller's sample into int32 arrays, or raise InvalidSampleError.

Everything here runs on the caller's thread before the sample is queued, so a bad sample is
refused with a precise message and can never reach (and poison) a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from packrunner.errors import InvalidSampleError

__all__ = ["PreparedSample", "SampleSchema"]

Int32Array = npt.NDArray[np.int32]
_INT32_MAX = np.iinfo(np.int32).max
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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
        """Validate ``sample`` and return it as int32 arrays.

        Raises:
            InvalidSampleError: With a message naming the input and what is wrong with it.
        """
        # The dict check first: it is the common case and much cheaper than the ABC check.
        if not isinstance(sample, dict) and not isinstance(sample, Mapping):
            raise InvalidSampleError(
                f"a sample must be a mapping of input name to 1-D integer array, "
                f"got {type(sample).__name__}"
            )
        known = self.known_inputs
        unknown = [name for name in sample if name not in known]
        if unknown:
            raise InvalidSampleError(
                f"unknown input name(s) {sorted(map(str, unknown))}; "
                f"this runner accepts {sorted(known)}",
                input_name=str(unknown[0]),
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

    def _as_ids(self, name: str, value: object, length: int | None = None) -> Int32Array:
        if isinstance(value, np.ndarray):
            array = value
        elif isinstance(value, list | tuple):
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise InvalidSampleError(
                    f"input {name!r} is not a 1-D integer array: {exc}", input_name=name
                ) from None
        else:
            raise InvalidSampleError(
                f"input {name!r} must be a numpy array or a list of ints, "
                f"got {type(value).__name__}",
                input_name=name,
            )
        if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
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
        return array

    def _check_values(self, name: str, array: npt.NDArray[np.generic]) -> Int32Array:
        limit = self.value_limits.get(name, _INT32_MAX + 1)
        # One reduction instead of min() and max(): seen as unsigned, negative values become
        # huge, so "every value in [0, limit)" is "the unsigned maximum is below limit".
        unsigned = array.view(_UNSIGNED[array.dtype.itemsize])
        if int(unsigned.max()) >= limit:
            low = int(array.min())
            if low < 0:
                raise InvalidSampleError(
                    f"input {name!r} has a negative value ({low})", input_name=name
                )
            raise InvalidSampleError(
                f"input {name!r} has value {int(array.max())}, must be < {limit}",
                input_name=name,
            )
        return np.ascontiguousarray(array, dtype=np.int32)
