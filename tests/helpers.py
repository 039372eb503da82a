"""Shared test helpers: deterministic data and devices with hooks (gates, failures)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner import SimulatedDevice, simulated_reference

VOCAB = 30522


def make_sample(rng: np.random.Generator, length: int) -> dict[str, npt.NDArray[np.int32]]:
    return {
        "input_ids": rng.integers(0, VOCAB, length, dtype=np.int32),
        "token_type_ids": rng.integers(0, 2, length, dtype=np.int32),
    }


def random_samples(n: int, seed: int = 0) -> list[dict[str, npt.NDArray[np.int32]]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(128, 128, n).astype(np.int32), 1, 256)
    return [make_sample(rng, int(length)) for length in lengths]


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
