"""Runner configuration (one frozen, validated dataclass), packing algorithms, input forms."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from packrunner.errors import ConfigError

__all__ = ["InputForm", "PackAlgorithm", "RunnerConfig"]


class PackAlgorithm(enum.Enum):
    """How queued samples are placed into the rows of a batch.

    Attributes:
        PADDED: one sample per row, padded to ``seq_len`` (PopRT's "Original" baseline).
        NEXT_FIT: PopRT semantics: keep filling the current row, open the next row when a sample
            does not fit; the batch closes when no row is left or at ``max_valid_num``.
        FIRST_FIT: PopRT semantics: each sample, in arrival order, goes into the first row with
            room; the batch closes at the first sample that fits nowhere or at ``max_valid_num``.
        LOOKAHEAD: packrunner's default. Each row is anchored by the oldest sample still waiting,
            then topped up with the largest samples that still fit, chosen from the oldest
            ``lookahead`` queued samples; per batch, first-fit's plan is kept instead when it
            leaves the rest of the window needing fewer batches, so lookahead is never worse
            than first-fit batch by batch. Starvation-free: the ``min(batch_size,
            max_valid_num)`` oldest waiting samples always go into the next batch (see
            ``packing._lookahead``).
        STREAM: across-rows mode (PopRT "end-to-end"): samples are laid end to end in the
            flattened ``batch_size * seq_len`` token stream and may cross row boundaries; needs a
            model of :attr:`InputForm.UNPACK_REPACK`.

    Which model input form each algorithm needs is :meth:`InputForm.for_algorithm`.
    """

    PADDED = "padded"
    NEXT_FIT = "next_fit"
    FIRST_FIT = "first_fit"
    LOOKAHEAD = "lookahead"
    STREAM = "stream"


class InputForm(enum.StrEnum):
    """How a static-shape model's inputs describe the samples of a ``[batch_size, seq_len]`` batch.

    The one name set for the model builder (``packrunner.models``), the converter
    (``packrunner.convert``), :class:`~packrunner.SimulatedDevice` and the docs. Members compare
    equal to their string values, so ``"packed"`` works wherever a form is asked for.

    Attributes:
        PACKED: several samples per row. ``attention_mask`` holds per-token segment ids (1, 2, ...
            for the samples of a row, 0 on padding) that the model turns into a block-diagonal
            attention bias; ``position_ids`` restart at 0 for every sample.
        PADDED: one sample per row, ``attention_mask`` a plain 0/1 padding mask (the classic
            Hugging Face export; the twin packed models are checked against).
        UNPACK_REPACK: the token inputs are one stream of ``batch_size * seq_len`` tokens in which
            samples sit back to back and may cross rows; ``unpack_info`` ``[max_valid_num]`` lists
            their lengths. Token-wise layers run on the stream, attention on a per-sample
            ``[max_valid_num, seq_len]`` view (PopRT "end-to-end").
    """

    PACKED = "packed"
    PADDED = "padded"
    UNPACK_REPACK = "unpack_repack"

    @classmethod
    def for_algorithm(cls, algorithm: PackAlgorithm) -> InputForm:
        """The form of the model an ``algorithm``'s batches are meant for.

        ``PADDED`` batches also run on a ``PACKED`` model (a row with one segment is a row with
        a 0/1 mask); this returns the padded twin, the model that baseline is measured on.
        """
        for form, default in _DEFAULT_ALGORITHMS.items():
            if default is algorithm:
                return form
        return cls.PACKED  # the row-packing algorithms other than the default

    @property
    def default_algorithm(self) -> PackAlgorithm:
        """The algorithm to run a model of this form with; inverse of :meth:`for_algorithm`."""
        return _DEFAULT_ALGORITHMS[self]

    @classmethod
    def parse(cls, value: InputForm | str, *, what: str = "form") -> InputForm:
        """``value`` (a member or its string value) as a form; ``ValueError`` naming the choices.

        Args:
            value: What a caller passed.
            what: The argument's name, for the error message.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(form.value) for form in cls)
            raise ValueError(f"{what} must be one of {choices}, got {value!r}") from None

    @classmethod
    def from_legacy(cls, value: str, *, what: str) -> InputForm:
        """:meth:`parse`, also accepting the names packrunner used before this vocabulary.

        Only for the hidden ``packrunner convert --attention`` alias, which scripts written
        before this vocabulary still pass (``block_diagonal``, ``padding``).
        """
        return cls.parse(_LEGACY_SPELLINGS.get(value, value), what=what)


# The one mapping between forms and algorithms (both directions read it).
_DEFAULT_ALGORITHMS: dict[InputForm, PackAlgorithm] = {
    InputForm.PACKED: PackAlgorithm.LOOKAHEAD,
    InputForm.PADDED: PackAlgorithm.PADDED,
    InputForm.UNPACK_REPACK: PackAlgorithm.STREAM,
}
# Names one input form had before InputForm; read only by InputForm.from_legacy.
_LEGACY_SPELLINGS: dict[str, InputForm] = {
    "block_diagonal": InputForm.PACKED,
    "padding": InputForm.PADDED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerConfig:
    """Configuration of a :class:`~packrunner.PackRunner`.

    Attributes:
        batch_size: Rows of the compiled batch.
        seq_len: Tokens per row of the compiled batch; the longest sample accepted.
        timeout_us: A partly filled batch is dispatched once its oldest waiting sample has waited
            this long (microseconds, monotonic clock). 0 dispatches whatever is queued as soon as
            a device is free.
        max_valid_num: Most samples in one batch (PopRT ``max_valid_num``).
        algorithm: Placement algorithm, see :class:`PackAlgorithm`.
        lookahead: How many of the oldest queued samples ``LOOKAHEAD`` considers per batch.
        max_queue_size: Most samples waiting to be packed; beyond it ``OverloadedError``.
        max_inflight_batches: Most batches packed but not finished (running or ready on a
            device). Default: one per device plus one prefetched.
        dynamic_input_name: The input whose length defines a sample's length.
        mask_input_name: The segment-id attention mask input of the device.
        vocab_size: When known, ids must be ``< vocab_size`` (checked at submit).
        type_vocab_size: ``token_type_ids`` must be in ``[0, type_vocab_size)``.
        device_timeout_s: Watchdog: a batch running longer than this on a device fails with
            :class:`~packrunner.DeviceTimeoutError`, its worker thread is abandoned and a fresh
            device is opened if the device can make one (:meth:`~packrunner.Device.replica`).
            Also bounds how long ``close()`` waits for a device. None disables the watchdog.
        check_finite: Fail, with :class:`~packrunner.DeviceError`, the samples whose outputs
            hold NaN or Inf (the rest of their batch is delivered). Costs one pass over the
            outputs per sample.
    """

    batch_size: int = 16
    seq_len: int = 256
    timeout_us: int = 15_000
    max_valid_num: int = 40
    algorithm: PackAlgorithm = PackAlgorithm.LOOKAHEAD
    lookahead: int = 256
    max_queue_size: int = 8192
    max_inflight_batches: int | None = None
    dynamic_input_name: str = "input_ids"
    mask_input_name: str = "attention_mask"
    vocab_size: int | None = None
    type_vocab_size: int = 2
    device_timeout_s: float | None = 60.0
    check_finite: bool = False
    token_type_input_name: str = field(default="token_type_ids")
    position_input_name: str = field(default="position_ids")
    unpack_info_input_name: str = field(default="unpack_info")

    def __post_init__(self) -> None:
        if isinstance(self.algorithm, str):
            try:
                object.__setattr__(self, "algorithm", PackAlgorithm(self.algorithm))
            except ValueError:
                choices = ", ".join(a.value for a in PackAlgorithm)
                raise ConfigError(
                    f"algorithm must be one of {choices}, got {self.algorithm!r}"
                ) from None
        if not isinstance(self.algorithm, PackAlgorithm):
            raise ConfigError(f"algorithm must be a PackAlgorithm, got {self.algorithm!r}")
        _require_int("batch_size", self.batch_size, minimum=1)
        _require_int("seq_len", self.seq_len, minimum=1)
        _require_int("timeout_us", self.timeout_us, minimum=0)
        _require_int("max_valid_num", self.max_valid_num, minimum=1)
        _require_int("lookahead", self.lookahead, minimum=1)
        _require_int("max_queue_size", self.max_queue_size, minimum=1)
        if self.max_inflight_batches is not None:
            _require_int("max_inflight_batches", self.max_inflight_batches, minimum=1)
        if self.vocab_size is not None:
            _require_int("vocab_size", self.vocab_size, minimum=1)
        _require_int("type_vocab_size", self.type_vocab_size, minimum=1)
        timeout = self.device_timeout_s
        if timeout is not None and (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout < math.inf
        ):
            raise ConfigError(
                f"device_timeout_s must be a positive finite number or None, got {timeout!r}"
            )
        if not isinstance(self.check_finite, bool):
            raise ConfigError(f"check_finite must be a bool, got {self.check_finite!r}")
        names = {
            "dynamic_input_name": self.dynamic_input_name,
            "mask_input_name": self.mask_input_name,
            "token_type_input_name": self.token_type_input_name,
            "position_input_name": self.position_input_name,
            "unpack_info_input_name": self.unpack_info_input_name,
        }
        for field_name, value in names.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{field_name} must be a non-empty string, got {value!r}")
        if len(set(names.values())) != len(names):
            raise ConfigError(f"input names must be distinct, got {names}")

    @property
    def capacity_tokens(self) -> int:
        """Token slots of one batch (``batch_size * seq_len``)."""
        return self.batch_size * self.seq_len

    @property
    def samples_cap(self) -> int:
        """Most samples one batch can hold with this algorithm."""
        if self.algorithm is PackAlgorithm.PADDED:
            return min(self.batch_size, self.max_valid_num)
        return self.max_valid_num


def _require_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; True as a batch size is a bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
