"""Runner configuration: one frozen, validated dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from packrunner.errors import ConfigError

__all__ = ["PackAlgorithm", "RunnerConfig"]


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
            ``lookahead`` queued samples. Starvation-free: the ``batch_size`` oldest waiting
            samples always go into the next batch (see ``packing.lookahead``).
        STREAM: across-rows mode (PopRT "end-to-end" / unpack-repack): samples are laid end to
            end in the flattened ``batch_size * seq_len`` token stream and may cross row
            boundaries; needs a model that takes ``unpack_info``.
    """

    PADDED = "padded"
    NEXT_FIT = "next_fit"
    FIRST_FIT = "first_fit"
    LOOKAHEAD = "lookahead"
    STREAM = "stream"


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
