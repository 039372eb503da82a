"""The dynamic-shape peers of ``packrunner bench``: their batches, and their outputs.

Each peer runs the padded model with dynamic axes at ``[rows, width]`` per batch; its outputs
must equal the padded run (one sample per row of the fixed ``[batch_size, seq_len]`` model),
for the default model and for all-MiniLM-L6-v2. A device that attends to the padding shows the
check bites.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrunner.bench.dataset import synthetic_dataset
from packrunner.bench.devices import DeviceSet
from packrunner.bench.dynamic import DynamicStrategy, plan_dynamic, run_dynamic
from packrunner.bench.offline import plan_dataset, run_offline
from packrunner.cli import main as cli_main
from packrunner.config import InputForm, PackAlgorithm, RunnerConfig
from packrunner.devices.base import Device
from packrunner.models import minilm_checkpoint_dir
from tests._support import MaskRewritingDevice

ROWS, WIDTH, CAP = 4, 32, 8
T = TypeVar("T")


def on_own_thread(work: Callable[[], T]) -> T:
    """Run ``work`` on a fresh thread: onnxruntime sessions opened with denormals-as-zero set
    that flag (per thread) on the thread that runs them, which must not be pytest's (hypothesis
    refuses to draw floats where subnormals cannot be represented)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


TOLERANCE = 1e-5
DYNAMIC = ["dynamic_fifo", "dynamic_sorted_window", "dynamic_sorted_oracle"]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), max_size=80),
    batch_size=st.integers(1, 9),
    window=st.integers(1, 40),
    strategy=st.sampled_from(list(DynamicStrategy)),
)
def test_every_sample_goes_once_into_a_batch_as_wide_as_its_longest(
    lengths: list[int], batch_size: int, window: int, strategy: DynamicStrategy
) -> None:
    batches = plan_dynamic(lengths, strategy, batch_size=batch_size, window=window)
    chosen = [i for batch in batches for i in batch.chosen]
    assert sorted(chosen) == list(range(len(lengths)))
    for batch in batches:
        group = [lengths[i] for i in batch.chosen]
        assert batch.shape == (len(group), max(group))
        assert 1 <= len(group) <= batch_size
        np.testing.assert_array_equal(batch.starts, np.arange(len(group)) * max(group))
    if strategy is DynamicStrategy.FIFO:
        assert chosen == list(range(len(lengths)))  # arrival order, chunks of batch_size
        assert all(b.num_samples == batch_size for b in batches[:-1])
    elif strategy is DynamicStrategy.SORTED_ORACLE:
        assert [lengths[i] for i in chosen] == sorted(lengths)
    else:  # each window of arrivals sorted on its own; no batch spans two windows
        for batch in batches:
            assert len({i // window for i in batch.chosen}) == 1
        for start in range(0, len(lengths), window):
            in_window = [i for i in chosen if start <= i < start + window]
            assert [lengths[i] for i in in_window] == sorted(lengths[start : start + window])


def _max_abs_diff(
    expected: Sequence[Mapping[str, npt.NDArray[Any]]],
    actual: Sequence[Mapping[str, npt.NDArray[Any]]],
) -> float:
    return max(
        float(np.abs(np.asarray(e[name]) - np.asarray(a[name])).max())
        for e, a in zip(expected, actual, strict=True)
        for name in e
    )


def _config() -> RunnerConfig:
    return RunnerConfig(
        batch_size=ROWS, seq_len=WIDTH, max_valid_num=CAP, algorithm=PackAlgorithm.PADDED
    )


def _padded_results(devices: DeviceSet, samples: list[Any]) -> list[dict[str, Any]]:
    """The padded run: one sample per row of the fixed [ROWS, WIDTH] padded model."""
    lengths = [len(s["input_ids"]) for s in samples]
    plans = plan_dataset(
        lengths, InputForm.PADDED, batch_size=ROWS, seq_len=WIDTH, max_valid_num=CAP
    )
    device = devices.make(InputForm.PADDED)

    def run() -> list[dict[str, Any]]:
        device.open()
        try:
            return run_offline(device, samples, plans, _config()).results
        finally:
            device.close()

    return on_own_thread(run)


def _peer_results(
    device: Device, samples: list[Any], strategy: DynamicStrategy
) -> list[dict[str, Any]]:
    lengths = [len(s["input_ids"]) for s in samples]
    batches = plan_dynamic(lengths, strategy, batch_size=ROWS, window=10)

    def run() -> list[dict[str, Any]]:
        device.open()
        try:
            return run_dynamic(device, samples, batches, _config()).results
        finally:
            device.close()

    return on_own_thread(run)


@pytest.fixture(scope="module", params=["default", "minilm"])
def devices(request: pytest.FixtureRequest) -> DeviceSet:
    checkpoint = minilm_checkpoint_dir() if request.param == "minilm" else None
    return DeviceSet.onnx(
        batch_size=ROWS, seq_len=WIDTH, max_valid_num=CAP, threads=1, checkpoint=checkpoint
    )


@pytest.mark.parametrize("distribution", ["seed", "short"])
def test_every_peer_equals_the_padded_run(devices: DeviceSet, distribution: str) -> None:
    samples = synthetic_dataset(
        distribution, 24, max_seq_len=WIDTH, emb_size=devices.vocab_size(30522)
    )
    expected = _padded_results(devices, samples)
    for strategy in DynamicStrategy:
        actual = _peer_results(devices.make_dynamic(), samples, strategy)
        assert _max_abs_diff(expected, actual) <= TOLERANCE, strategy
    # Negative control: attending to the padding moves every sample shorter than its batch.
    corrupted = _peer_results(
        MaskRewritingDevice(devices.make_dynamic(), np.ones_like), samples, DynamicStrategy.FIFO
    )
    assert _max_abs_diff(expected, corrupted) > 100 * TOLERANCE


def test_bench_runs_the_dynamic_peers_and_checks_them(tmp_path: Any, capsys: Any) -> None:
    code = on_own_thread(lambda: cli_main(
        [
            "bench", "--device", "onnx", "--batch-size", str(ROWS), "--seq-len", str(WIDTH),
            "--max-valid-num", str(CAP), "--iterations", "3", "--repeats", "1", "--threads", "1",
            "--distribution", "short", "--dynamic-peers", "--throughput-only", "--skip-peer",
            "--modes", f"original,{','.join(DYNAMIC)}",
            "--quiet", "--json", "--results-dir", str(tmp_path),
        ]
    ))  # fmt: skip
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["distribution"] == "short"
    assert list(payload["modes"]) == ["original", "online_padded", "online_lookahead", *DYNAMIC]
    assert payload["closed_loop"]["targets"] == {} and "plots" not in payload
    for name in DYNAMIC:
        mode = payload["modes"][name]
        assert mode["kind"] == "dynamic" and mode["samples_per_s_median"] > 0
        assert mode["packrunner_speedup"] > 0
        for output in payload["accuracy"][f"original vs {name}"].values():
            assert output["max_abs_diff"] <= TOLERANCE
    assert payload["modes"]["online_lookahead"]["packrunner_speedup"] == 1.0


def test_dynamic_peers_need_a_dynamic_model(tmp_path: Any, capsys: Any) -> None:
    code = cli_main(["bench", "--dynamic-peers", "--results-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "padded model with dynamic axes" in capsys.readouterr().err
