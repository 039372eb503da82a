"""packrunner.compat.poprt_runtime: PopRT's PackRunnerConfig / Runner / future API."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from packrunner import (
    ConfigError,
    DeviceError,
    InvalidSampleError,
    RequestTimeoutError,
    RunnerClosedError,
)
from packrunner import PackAlgorithm as CoreAlgorithm
from packrunner.compat import poprt_runtime as runtime
from packrunner.devices.onnx import OnnxDevice

from ._support import (
    BATCH_SIZE,
    MAX_VALID_NUM,
    OUTPUTS,
    SEQ_LEN,
    TOLERANCE,
    PaddedReference,
    Sample,
    make_samples,
)


def single_row_config(
    algorithm: runtime.PackAlgorithm | None = None, timeout_us: int = 1000, **kwargs: Any
) -> runtime.PackRunnerConfig:
    config = runtime.PackRunnerConfig(timeout_microseconds=timeout_us, **kwargs)
    if algorithm is not None:
        config.algorithm = algorithm
    config.enable_input_single_row_mode("attention_mask")
    return config


def out_dict(dtype: type[np.floating[Any]] = np.float16, fill: float = 7.0) -> dict[str, Any]:
    # Prefilled with non-zeros so the test sees that positions past the length are zeroed.
    return {name: np.full(SEQ_LEN, fill, dtype=dtype) for name in OUTPUTS}


def assert_written(
    out: Mapping[str, npt.NDArray[Any]], sample: Sample, reference: PaddedReference
) -> None:
    expected = reference(sample)
    length = sample.input_len
    for name in OUTPUTS:
        array = out[name]
        # Exact up to the fp32 packed-vs-padded noise, then the caller's dtype rounding.
        tolerance = TOLERANCE + (float(np.finfo(array.dtype).eps) * 2 if array.itemsize < 4 else 0)
        np.testing.assert_allclose(
            array[:length].astype(np.float64), expected[name], rtol=tolerance, atol=tolerance
        )
        assert not array[length:].any(), f"{name} not zeroed past the sample's length"


@pytest.fixture
def packed_runner(packed_model: Path) -> Iterator[runtime.Runner]:
    with runtime.Runner(packed_model, single_row_config(runtime.PackAlgorithm.first_fit)) as r:
        yield r


# ------------------------------------------------------------------------- PackRunnerConfig


def test_config_defaults_are_poprts() -> None:
    config = runtime.PackRunnerConfig()
    assert config.timeout_microseconds == 0
    assert config.max_valid_num == 0
    assert config.dynamic_input_name == ""
    assert config.unpack_info_input_name == ""
    assert config.algorithm is runtime.PackAlgorithm.next_fit  # PopRT's C++ default
    assert not config.single_row_mode
    assert config.mask_name == ""


def test_config_keywords_and_attributes_round_trip() -> None:
    config = runtime.PackRunnerConfig(
        timeout_microseconds=15000, max_valid_num=40, dynamic_input_name="input_ids"
    )
    config.algorithm = runtime.PackAlgorithm.first_fit
    config.enable_input_single_row_mode("attention_mask")
    config.timeout_microseconds = 500
    assert (config.timeout_microseconds, config.max_valid_num) == (500, 40)
    assert config.algorithm is runtime.PackAlgorithm.first_fit
    assert config.single_row_mode and config.mask_name == "attention_mask"
    assert "first_fit" in repr(config) and "attention_mask" in repr(config)
    config.algorithm = "lookahead"  # strings of the enum values are accepted too
    assert config.algorithm is runtime.PackAlgorithm.lookahead


def test_misspelt_attribute_raises_with_a_suggestion() -> None:
    config = runtime.PackRunnerConfig()
    # Graphcore's own DeBERTa example sets config.algorithom, which PopRT silently ignored.
    with pytest.raises(AttributeError, match="did you mean 'algorithm'"):
        config.algorithom = runtime.PackAlgorithm.first_fit
    assert config.algorithm is runtime.PackAlgorithm.next_fit
    with pytest.raises(AttributeError, match="no attribute 'max_valid_nums'"):
        config.max_valid_nums = 3
    with pytest.raises(AttributeError, match="did you mean 'timeout_microseconds'"):
        _ = config.timeout_microsecond
    with pytest.raises(AttributeError, match="does not need"):
        config.enable_padding_remove = True
    with pytest.raises(AttributeError, match="read-only"):
        config.mask_name = "attention_mask"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_microseconds", -1),
        ("timeout_microseconds", 1.5),
        ("max_valid_num", True),
        ("dynamic_input_name", 3),
        ("algorithm", "best_fit"),
        ("algorithm", CoreAlgorithm.STREAM),
    ],
)
def test_bad_config_values_raise_config_error(field: str, value: object) -> None:
    config = runtime.PackRunnerConfig()
    with pytest.raises(ConfigError):
        setattr(config, field, value)


def test_single_row_mode_arguments() -> None:
    config = runtime.PackRunnerConfig()
    with pytest.raises(NotImplementedError, match="delimiter_num=1"):
        config.enable_input_single_row_mode("attention_mask", "unpack_info", 1)
    assert not config.single_row_mode
    with pytest.raises(ConfigError):
        config.enable_input_single_row_mode("")
    config.enable_input_single_row_mode("attention_mask", "unpack_info", 0)
    assert config.single_row_mode


# ------------------------------------------------------------------- config -> engine


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (None, CoreAlgorithm.NEXT_FIT),
        (runtime.PackAlgorithm.next_fit, CoreAlgorithm.NEXT_FIT),
        (runtime.PackAlgorithm.first_fit, CoreAlgorithm.FIRST_FIT),
        (runtime.PackAlgorithm.lookahead, CoreAlgorithm.LOOKAHEAD),
    ],
)
def test_algorithm_reaches_the_engine(
    packed_model: Path, algorithm: runtime.PackAlgorithm | None, expected: CoreAlgorithm
) -> None:
    with runtime.Runner(packed_model, single_row_config(algorithm, timeout_us=1234)) as runner:
        config = runner.runner_config
        assert config.algorithm is expected
        assert runner.pack_runner.config is config
        assert (config.batch_size, config.seq_len, config.timeout_us) == (
            BATCH_SIZE,
            SEQ_LEN,
            1234,
        )
        assert config.mask_input_name == "attention_mask"
        assert config.vocab_size == 30522  # read from the embedding table: checked at submit


@pytest.mark.parametrize(
    ("algorithm", "batches"),
    [
        # Lengths 10, 10, 6, 6 into 2 rows of 16: next fit closes after [10], [10, 6];
        # first fit and lookahead fit all four as [10, 6], [10, 6].
        (runtime.PackAlgorithm.next_fit, 2),
        (runtime.PackAlgorithm.first_fit, 1),
        (runtime.PackAlgorithm.lookahead, 1),
    ],
)
def test_algorithm_changes_how_samples_are_packed(
    packed_model: Path,
    reference: PaddedReference,
    algorithm: runtime.PackAlgorithm,
    batches: int,
) -> None:
    samples = make_samples([10, 10, 6, 6])
    # A long timeout: only a full batch goes early, so the packing decides the batch count.
    config = single_row_config(algorithm, timeout_us=300_000)
    with runtime.Runner(packed_model, config) as runner:
        outs = [out_dict(np.float32) for _ in samples]
        futures = [runner.execute_async(s.feeds(), o) for s, o in zip(samples, outs, strict=True)]
        for future in futures:
            future.wait()
        assert runner.stats().batches == batches
    for sample, out in zip(samples, outs, strict=True):
        assert_written(out, sample, reference)


def test_max_valid_num_zero_means_no_cap(packed_model: Path, unpack_repack_model: Path) -> None:
    with runtime.Runner(packed_model, single_row_config()) as runner:
        assert runner.runner_config.max_valid_num == BATCH_SIZE * SEQ_LEN
    with runtime.Runner(packed_model, single_row_config(max_valid_num=5)) as runner:
        assert runner.runner_config.max_valid_num == 5
    with runtime.Runner(unpack_repack_model, runtime.PackRunnerConfig()) as runner:
        assert runner.runner_config.max_valid_num == MAX_VALID_NUM  # the unpack_info length
        assert runner.runner_config.algorithm is CoreAlgorithm.STREAM


def test_across_rows_ignores_the_algorithm(unpack_repack_model: Path) -> None:
    config = runtime.PackRunnerConfig()
    config.algorithm = runtime.PackAlgorithm.first_fit
    with runtime.Runner(unpack_repack_model, config) as runner:
        assert runner.runner_config.algorithm is CoreAlgorithm.STREAM


def test_model_and_mode_mismatches_are_config_errors(
    packed_model: Path, unpack_repack_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="enable_input_single_row_mode"):
        runtime.Runner(packed_model, runtime.PackRunnerConfig())
    with pytest.raises(ConfigError, match="unpack/repack model"):
        runtime.Runner(unpack_repack_model, single_row_config())
    with pytest.raises(ConfigError, match="expected"):
        runtime.Runner(unpack_repack_model, runtime.PackRunnerConfig(max_valid_num=3))
    with pytest.raises(ConfigError, match="not a file"):
        runtime.Runner(tmp_path / "missing.popef", single_row_config())
    not_onnx = tmp_path / "executable.popef"
    not_onnx.write_bytes(b"\x00 this is a PopRT PopEF, not ONNX \xff")
    with pytest.raises(ConfigError, match="not an ONNX model"):
        runtime.Runner(not_onnx, single_row_config())
    with pytest.raises(TypeError, match="PackRunnerConfig"):
        runtime.Runner(packed_model, object())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- execute


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_execute_writes_the_callers_arrays(
    packed_runner: runtime.Runner,
    reference: PaddedReference,
    dtype: type[np.floating[Any]],
) -> None:
    for sample in make_samples([1, 7, SEQ_LEN], seed=3):
        out = out_dict(dtype)
        packed_runner.execute(sample.feeds(), out)
        assert all(out[name].dtype == dtype for name in OUTPUTS)
        assert_written(out, sample, reference)


def test_execute_accepts_the_minimal_and_the_full_poprt_feeds(
    packed_runner: runtime.Runner, reference: PaddedReference
) -> None:
    (sample,) = make_samples([9], seed=4)
    minimal = {"input_ids": sample.input_ids, "token_type_ids": sample.token_type_ids}
    out = out_dict()
    packed_runner.execute(minimal, out)
    assert_written(out, sample, reference)
    # PopRT callers may also pass an unpack_info placeholder; single-row mode ignores it.
    full = {**sample.feeds(), "unpack_info": np.zeros(40, dtype=np.int32)}
    out = out_dict()
    packed_runner.execute(full, out)
    assert_written(out, sample, reference)
    # Only the outputs named in out_dict are written.
    partial = {"end_logits": np.zeros(SEQ_LEN, dtype=np.float16)}
    packed_runner.execute(sample.feeds(), partial)
    np.testing.assert_allclose(
        partial["end_logits"][:9], reference(sample)["end_logits"], rtol=2e-3, atol=2e-3
    )


def test_execute_async_from_one_thread(
    packed_runner: runtime.Runner, reference: PaddedReference
) -> None:
    samples = make_samples([int(n) for n in np.random.default_rng(5).integers(1, 17, 40)], seed=5)
    outs = [out_dict() for _ in samples]
    futures = [
        packed_runner.execute_async(s.feeds(), o) for s, o in zip(samples, outs, strict=True)
    ]
    # No thread per request, no helper thread: just the engine and the device worker.
    names = [t.name for t in threading.enumerate() if t.name.startswith("packrunner-")]
    assert sorted(names) == ["packrunner-device-0", "packrunner-engine"], names
    for future in futures:
        future.wait()
        assert future.done()
    for sample, out in zip(samples, outs, strict=True):
        assert_written(out, sample, reference)
    assert packed_runner.stats().completed == len(samples)


def test_execute_from_many_threads(
    packed_runner: runtime.Runner, reference: PaddedReference
) -> None:
    samples = make_samples([int(n) for n in np.random.default_rng(6).integers(1, 17, 48)], seed=6)
    outs = [out_dict() for _ in samples]
    errors: list[BaseException] = []

    def client(start: int) -> None:
        try:
            for index in range(start, len(samples), 12):
                packed_runner.execute(samples[index].feeds(), outs[index])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(start,)) for start in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for sample, out in zip(samples, outs, strict=True):
        assert_written(out, sample, reference)
    assert packed_runner.stats().mean_samples_per_batch > 1  # the clients' samples were packed


def test_unpack_repack_mode(unpack_repack_model: Path, reference: PaddedReference) -> None:
    samples = make_samples([16, 9, 12, 3, 16, 5], seed=7)
    with runtime.Runner(unpack_repack_model, runtime.PackRunnerConfig(1000)) as runner:
        outs = [out_dict() for _ in samples]
        futures = [
            runner.execute_async(
                {**s.feeds(), "unpack_info": np.zeros(MAX_VALID_NUM, dtype=np.int32)}, o
            )
            for s, o in zip(samples, outs, strict=True)
        ]
        for future in futures:
            future.wait()
        with pytest.raises(InvalidSampleError, match="length max_valid_num=6"):
            runner.execute_async(
                {**samples[0].feeds(), "unpack_info": np.zeros(40, dtype=np.int32)}, out_dict()
            )
        with pytest.raises(InvalidSampleError, match="integer"):
            runner.execute(
                {**samples[0].feeds(), "unpack_info": np.zeros(MAX_VALID_NUM)}, out_dict()
            )
    for sample, out in zip(samples, outs, strict=True):
        assert_written(out, sample, reference)


# -------------------------------------------------------------------------------- errors


def test_bad_feeds_and_out_dicts_raise_at_submit(packed_runner: runtime.Runner) -> None:
    (sample,) = make_samples([5])
    feeds = sample.feeds()
    cases: list[tuple[Any, Any, str]] = [
        ({**feeds, "input_mask": feeds["attention_mask"]}, out_dict(), "unknown input"),
        ({"token_type_ids": feeds["token_type_ids"]}, out_dict(), "missing required input"),
        ({**feeds, "input_ids": np.arange(SEQ_LEN + 1)}, out_dict(), "1..16 tokens"),
        ({**feeds, "input_ids": np.zeros((1, 5), np.int32)}, out_dict(), "1-D"),
        ([1, 2, 3], out_dict(), "mapping"),
        (feeds, {"logits": np.zeros(SEQ_LEN, np.float16)}, "unknown output"),
        (feeds, {"end_logits": np.zeros(SEQ_LEN, np.int32)}, "float dtype"),
        (feeds, {"end_logits": np.zeros(4, np.float16)}, "shape"),
        (feeds, {"end_logits": np.zeros((SEQ_LEN, 2), np.float16)}, "shape"),
        (feeds, {"end_logits": [0.0] * SEQ_LEN}, "numpy array"),
    ]
    for bad_feeds, bad_out, message in cases:
        for call in (packed_runner.execute, packed_runner.execute_async):
            with pytest.raises(InvalidSampleError, match=message):
                call(bad_feeds, bad_out)
    assert packed_runner.stats().requests == 0  # nothing reached the engine


def test_ids_beyond_the_vocabulary_are_refused_at_submit(packed_runner: runtime.Runner) -> None:
    (sample,) = make_samples([5])
    bad_ids = {**sample.feeds(), "input_ids": np.full(5, 30522, dtype=np.int32)}
    for call in (packed_runner.execute_async, packed_runner.execute):
        with pytest.raises(InvalidSampleError, match="must be < 30522"):
            call(bad_ids, out_dict())
    assert packed_runner.stats().requests == 0


def test_device_failures_are_device_errors(
    packed_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: OnnxDevice, feeds: Mapping[str, Any]) -> dict[str, Any]:
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(OnnxDevice, "run", broken)
    (sample,) = make_samples([5])
    with runtime.Runner(packed_model, single_row_config()) as runner:
        future = runner.execute_async(sample.feeds(), out_dict())
        with pytest.raises(DeviceError) as caught:
            future.wait()
        assert isinstance(caught.value.__cause__, RuntimeError)
        with pytest.raises(DeviceError):
            runner.execute(sample.feeds(), out_dict())


def test_wait_timeout_withdraws_the_sample(packed_model: Path) -> None:
    (sample,) = make_samples([5])
    # One small sample never fills a batch, so it waits for the 10 s timeout.
    with runtime.Runner(packed_model, single_row_config(timeout_us=10_000_000)) as runner:
        future = runner.execute_async(sample.feeds(), out_dict())
        with pytest.raises(RequestTimeoutError, match="withdrawn"):
            future.wait(timeout=0.05)
        assert future.done()
        with pytest.raises(RequestTimeoutError, match="earlier wait"):
            future.wait()
        # Cancelling the engine's future withdraws the sample synchronously, inside wait().
        assert runner.stats().withdrawn == 1
        assert runner.stats().batches == 0


# ----------------------------------------------------------------------------- lifecycle


def test_close_drains_pending_futures(packed_model: Path, reference: PaddedReference) -> None:
    samples = make_samples([3, 4, 5], seed=8)
    runner = runtime.Runner(packed_model, single_row_config(timeout_us=10_000_000))
    outs = [out_dict() for _ in samples]
    futures = [runner.execute_async(s.feeds(), o) for s, o in zip(samples, outs, strict=True)]
    runner.close()  # does not wait 10 s: closing dispatches what is queued
    assert all(future.done() for future in futures)
    for future, sample, out in zip(futures, samples, outs, strict=True):
        future.wait()
        assert_written(out, sample, reference)
    runner.close()  # idempotent
    with pytest.raises(RunnerClosedError):
        runner.execute_async(samples[0].feeds(), out_dict())
    with pytest.raises(RunnerClosedError):
        runner.execute(samples[0].feeds(), out_dict())


def test_a_forgotten_runner_is_closed_when_collected(packed_model: Path) -> None:
    runner = runtime.Runner(packed_model, single_row_config())
    (sample,) = make_samples([5])
    runner.execute_async(sample.feeds(), out_dict()).wait()
    del runner
    gc.collect()
    # The autouse fixture in tests/conftest.py also fails the test on any leaked thread.
    assert not [t for t in threading.enumerate() if t.name.startswith("packrunner-")]


def test_no_thread_outlives_the_interpreter(packed_model: Path) -> None:
    # A script that never closes its runner, with a request waiting on a ~33 min timeout, must
    # exit cleanly within the subprocess's 60 s limit: the finalizer drains the runner at
    # interpreter exit rather than waiting for the timeout.
    # The report hook is registered before any weakref.finalize exists, so (atexit is LIFO)
    # it runs after the finalizers and sees what they left behind.
    script = f"""
import atexit, threading, weakref
assert not weakref.finalize._registered_with_atexit
def report():
    names = [t.name for t in threading.enumerate() if t.name.startswith("packrunner-")]
    print("threads", names, "written", bool(out["start_logits"].any()), future.done())
atexit.register(report)
import numpy as np
from packrunner.compat import poprt_runtime as runtime
config = runtime.PackRunnerConfig(timeout_microseconds=2_000_000_000)
config.enable_input_single_row_mode("attention_mask")
runner = runtime.Runner({str(packed_model)!r}, config)
out = {{"start_logits": np.zeros({SEQ_LEN}, np.float16)}}
future = runner.execute_async({{"input_ids": np.arange(1, 6)}}, out)
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
    assert completed.stdout.strip() == "threads [] written True True"
