"""Shared test helpers: deterministic data and devices with hooks (gates, failures)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from packrunner import SimulatedDevice, simulated_reference

VOCAB = 30522


def seed_lengths(n: int, *, avg: int = 128, max_len: int = 256, seed: int = 2023) -> list[int]:
    """The seed's synthetic length distribution."""
    # The seed uses the legacy global generator; RandomState(seed) replays the same stream.
    legacy = np.random.RandomState(seed)
    lengths = np.clip(legacy.normal(avg, avg, size=n).astype(np.int32), 1, max_len)
    return [int(x) for x in lengths]


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
        mask = feeds.get("attention_mask")
        if mask is not None:
            self.batch_sizes.append(int(sum(len(np.unique(r[r > 0])) for r in mask)))
        return super().run(feeds)


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
