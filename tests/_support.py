"""Helpers shared by every test area: samples, reference packers, devices with hooks.

The reference packers are deliberately naive and independent of :mod:`packrunner.packing`: the
graph and converter tests check models against layouts written out by hand, so a bug in the
engine's packer cannot hide a graph bug (or the reverse). Each test area keeps what only it
needs in its own ``_support.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner import ShapeSet, SimulatedDevice, simulated_reference
from packrunner.devices.base import Device, OutputSpec, TensorSpec

VOCAB = 30522


IntArray = npt.NDArray[np.int32]
Feeds = dict[str, IntArray]


def make_sample(rng: np.random.Generator, length: int) -> dict[str, npt.NDArray[np.int32]]:
    return {
        "input_ids": rng.integers(0, VOCAB, length, dtype=np.int32),
        "token_type_ids": rng.integers(0, 2, length, dtype=np.int32),
    }


def random_samples(n: int, seed: int = 0) -> list[dict[str, npt.NDArray[np.int32]]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(128, 128, n).astype(np.int32), 1, 256)
    return [make_sample(rng, int(length)) for length in lengths]


@dataclass(frozen=True)
class Sample:
    """One unpadded input sequence (int32 ids and token types of one length)."""

    input_ids: IntArray
    token_type_ids: IntArray

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Placement:
    """Where a sample landed: its row (or stream slot), first token, length and segment id."""

    row: int
    offset: int
    length: int
    segment: int = 1


def token_samples(
    rng: np.random.Generator,
    lengths: Sequence[int],
    vocab_size: int,
    *,
    type_vocab_size: int = 2,
    pairs: bool = False,
) -> list[Sample]:
    """Samples of the given lengths, token ids below ``vocab_size``.

    Token types are random 0/1, or with ``pairs`` switch from 0 to 1 at a random point like a
    text pair. A length of 0 gives an empty sample (a zero-length stream slot).
    """
    samples = []
    for length in lengths:
        ids = rng.integers(0, vocab_size, size=length).astype(np.int32)
        if pairs and length:
            split = int(rng.integers(1, length + 1))
            types = (np.arange(length) >= split).astype(np.int32) % type_vocab_size
        else:
            types = rng.integers(0, 2, size=length).astype(np.int32)
        samples.append(Sample(ids, types.astype(np.int32)))
    return samples


def pack_rows(
    rows: Sequence[Sequence[Sample]], batch_size: int, seq_len: int
) -> tuple[Feeds, list[Placement]]:
    """Row ``r`` holds ``rows[r]`` back to back: segment ids 1, 2, ..., positions from 0 each.

    Returns:
        Feeds for a packed-form model and, per sample in row-major order, its placement.
    """
    assert len(rows) <= batch_size
    feeds: Feeds = {
        name: np.zeros((batch_size, seq_len), dtype=np.int32)
        for name in ("input_ids", "token_type_ids", "position_ids", "attention_mask")
    }
    placements = []
    for r, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row, start=1):
            end = start + sample.length
            assert end <= seq_len, f"row {r} overflows"
            feeds["input_ids"][r, start:end] = sample.input_ids
            feeds["token_type_ids"][r, start:end] = sample.token_type_ids
            feeds["position_ids"][r, start:end] = np.arange(sample.length)
            feeds["attention_mask"][r, start:end] = segment
            placements.append(Placement(r, start, sample.length, segment))
            start = end
    return feeds, placements


def pack_first_fit(
    samples: Sequence[Sample], batch_size: int, seq_len: int, *, rows_used: int | None = None
) -> tuple[Feeds, list[Placement]]:
    """First-fit the samples into rows (only the first ``rows_used`` rows, if given).

    Returns:
        Feeds for a packed-form model and, per sample in input order, its placement.

    Raises:
        ValueError: A sample does not fit anywhere.
    """
    limit = batch_size if rows_used is None else rows_used
    rows: list[list[int]] = [[] for _ in range(limit)]
    fill = [0] * limit
    for index, sample in enumerate(samples):
        row = next((r for r in range(limit) if fill[r] + sample.length <= seq_len), None)
        if row is None:
            raise ValueError(f"sample of length {sample.length} does not fit")
        rows[row].append(index)
        fill[row] += sample.length
    feeds, placements = pack_rows([[samples[i] for i in row] for row in rows], batch_size, seq_len)
    order = [index for row in rows for index in row]
    by_sample = dict(zip(order, placements, strict=True))
    return feeds, [by_sample[i] for i in range(len(samples))]


def pack_padded(samples: Sequence[Sample], batch_size: int, seq_len: int) -> Feeds:
    """The classic layout: sample ``i`` alone in row ``i``, 0/1 attention mask."""
    assert len(samples) <= batch_size
    feeds: Feeds = {
        name: np.zeros((batch_size, seq_len), dtype=np.int32)
        for name in ("input_ids", "token_type_ids", "attention_mask")
    }
    for r, sample in enumerate(samples):
        feeds["input_ids"][r, : sample.length] = sample.input_ids
        feeds["token_type_ids"][r, : sample.length] = sample.token_type_ids
        feeds["attention_mask"][r, : sample.length] = 1
    return feeds


def pack_stream(
    samples: Sequence[Sample], batch_size: int, seq_len: int, max_valid_num: int
) -> tuple[Feeds, list[int]]:
    """Across-rows packing: samples back to back in the flattened ``batch_size * seq_len`` stream.

    ``samples`` fill the ``unpack_info`` slots in order (an empty sample is a zero-length slot);
    the other slots are 0.

    Returns:
        Feeds for an unpack/repack model and each sample's start in the stream.

    Raises:
        ValueError: The samples do not fit the stream or its slots.
    """
    total = batch_size * seq_len
    if sum(s.length for s in samples) > total or len(samples) > max_valid_num:
        raise ValueError("samples do not fit the stream")
    flat = {name: np.zeros(total, dtype=np.int32) for name in ("ids", "types", "positions")}
    unpack_info = np.zeros(max_valid_num, dtype=np.int32)
    starts = []
    cursor = 0
    for slot, sample in enumerate(samples):
        end = cursor + sample.length
        flat["ids"][cursor:end] = sample.input_ids
        flat["types"][cursor:end] = sample.token_type_ids
        flat["positions"][cursor:end] = np.arange(sample.length)
        unpack_info[slot] = sample.length
        starts.append(cursor)
        cursor = end
    shape = (batch_size, seq_len)
    feeds: Feeds = {
        "input_ids": flat["ids"].reshape(shape),
        "token_type_ids": flat["types"].reshape(shape),
        "position_ids": flat["positions"].reshape(shape),
        "unpack_info": unpack_info,
    }
    return feeds, starts


def reference(sample: Mapping[str, Any]) -> dict[str, npt.NDArray[np.float32]]:
    return simulated_reference(
        sample["input_ids"], sample.get("token_type_ids"), sample.get("position_ids")
    )


def assert_matches_reference(sample: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    expected = reference(sample)
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].shape == value.shape, name
        np.testing.assert_array_equal(result[name], value, err_msg=name)


def samples_in(feeds: Mapping[str, npt.NDArray[Any]]) -> int:
    """Samples in a packed batch: distinct segment ids per row of its attention mask."""
    return int(sum(len(np.unique(row[row > 0])) for row in feeds["attention_mask"]))


class GatedDevice(SimulatedDevice):
    """A SimulatedDevice whose runs block until the test opens the gate."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("batch_latency_us", 0)
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.batch_sizes: list[int] = []

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.entered.release()
        self.gate.wait()
        if "attention_mask" in feeds:
            self.batch_sizes.append(samples_in(feeds))
        return super().run(feeds)


class SteppedDevice(SimulatedDevice):
    """A SimulatedDevice that runs one batch per ``allow.release()``.

    Use it through the ``stepped_device`` fixture, which lets every batch through at teardown
    so that a failing test never leaves the runner's threads blocked on it.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("batch_latency_us", 0)
        super().__init__(**kwargs)
        self.allow = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)
        self.batch_sizes: list[int] = []

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        self.entered.release()
        self.allow.acquire()
        self.batch_sizes.append(samples_in(feeds))
        return super().run(feeds)

    def release_all(self) -> None:
        """Let every batch through, now and later."""
        self.allow.release(1_000_000)


class PoisonDevice(SimulatedDevice):
    """Raises on any batch that contains the poison token id."""

    POISON = 7

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("batch_latency_us", 0)
        super().__init__(**kwargs)

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if bool((feeds["input_ids"] == self.POISON).any()):
            raise RuntimeError("device fault: poison token")
        return super().run(feeds)


#: Faults a FaultyDevice can inject, one per batch.
FAULTS = (
    "raise",  # RuntimeError from run()
    "cancelled",  # asyncio.CancelledError (a BaseException) from run()
    "interrupt",  # KeyboardInterrupt from run()
    "exit",  # SystemExit from run()
    "transposed",  # an output of the wrong shape
    "missing",  # an output left out
    "extra_dim",  # an output with one more dimension
    "nan",  # NaN in one token of one sample
    "slow",  # takes a while (still well under the watchdog)
    "hang",  # never returns until the test releases it
)


class FaultPlan:
    """The shared, seeded fault schedule of a FaultyDevice and all its replicas."""

    def __init__(self, seed: int, rate: float, faults: tuple[str, ...] = FAULTS) -> None:
        self.rng = np.random.default_rng(seed)
        self.rate = rate
        self.faults = faults
        self.lock = threading.Lock()
        self.release = threading.Event()  # unblocks every hung run
        self.hanging = threading.Semaphore(0)  # released as each run starts hanging
        self.hung = threading.Event()  # set once any run has started hanging
        self.injected: dict[str, int] = {}
        self.forced: list[str] = []  # faults to inject next, before any random ones

    def next_fault(self) -> str | None:
        with self.lock:
            if self.forced:
                fault: str | None = self.forced.pop(0)
            elif self.rng.random() < self.rate:
                fault = str(self.rng.choice(self.faults))
            else:
                fault = None
            if fault is not None:
                self.injected[fault] = self.injected.get(fault, 0) + 1
            return fault


class FaultyDevice(SimulatedDevice):
    """A SimulatedDevice that injects the faults of its FaultPlan; its replicas share it."""

    def __init__(self, plan: FaultPlan, *, replaceable: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("batch_latency_us", 0)
        super().__init__(**kwargs)
        self.plan = plan
        self.replaceable = replaceable
        self._kwargs = kwargs

    def replica(self) -> FaultyDevice | None:  # type: ignore[override]
        if not self.replaceable:
            return None
        return FaultyDevice(self.plan, replaceable=True, **self._kwargs)

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        fault = self.plan.next_fault()
        if fault == "raise":
            raise RuntimeError("injected device fault")
        if fault == "cancelled":
            raise asyncio.CancelledError("injected")
        if fault == "interrupt":
            raise KeyboardInterrupt("injected")
        if fault == "exit":
            raise SystemExit("injected")
        if fault == "hang":
            self.plan.hanging.release()
            self.plan.hung.set()
            self.plan.release.wait()
        if fault == "slow":
            time.sleep(0.005)  # simulated work, as SimulatedDevice's own latency
        outputs = super().run(feeds)
        if fault == "transposed":
            outputs["start_logits"] = np.ascontiguousarray(outputs["start_logits"].T)
        elif fault == "missing":
            del outputs["end_logits"]
        elif fault == "extra_dim":
            outputs["end_logits"] = outputs["end_logits"][..., None]
        elif fault == "nan":
            mask = feeds.get("attention_mask")
            valid = np.flatnonzero((mask if mask is not None else feeds["input_ids"]) > 0)
            if len(valid):
                outputs["start_logits"].reshape(-1)[valid[0]] = np.nan
        return outputs


class MaskRewritingDevice(Device):
    """Negative control: ``inner`` fed ``rewrite(attention_mask)`` instead of the real mask.

    E.g. segment ids flattened to 0/1 (packed samples see each other) or all ones (padding is
    attended to): the corruption an equivalence check must catch.
    """

    def __init__(
        self, inner: Device, rewrite: Callable[[npt.NDArray[Any]], npt.NDArray[Any]]
    ) -> None:
        self.inner = inner
        self.rewrite = rewrite

    @property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        return self.inner.input_specs

    @property
    def output_specs(self) -> Mapping[str, OutputSpec]:
        return self.inner.output_specs

    @property
    def shapes(self) -> ShapeSet:
        return self.inner.shapes

    def open(self) -> None:
        self.inner.open()

    def run(
        self, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        corrupted = dict(feeds)
        mask = np.asarray(feeds["attention_mask"])
        corrupted["attention_mask"] = self.rewrite(mask).astype(mask.dtype)
        return self.inner.run(corrupted)

    def close(self) -> None:
        self.inner.close()
