"""Shape-aware packing on onnxruntime: every shape equals the per-sample padded run.

The default model's dynamic-axes build serves a bucketed device (run at three compiled shapes)
and a dynamic device (any shape up to the budget); fixed-shape files serve a one-file-per-bucket
device. Each runs through PackRunner, and every sample's outputs are compared with the padded
model run on that sample alone (``[1, length]``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrunner import (
    ConfigError,
    Device,
    OnnxDevice,
    PackRunner,
    RunnerConfig,
    ShapeSet,
)
from packrunner.models import default_model_path
from tests._support import MaskRewritingDevice, make_sample

TOLERANCE = 1e-5
BUCKETS = ShapeSet.buckets([(64, 64), (32, 128), (16, 256)])
DYNAMIC = ShapeSet.dynamic(max_rows=64, max_width=256, max_tokens=4096)
OUTPUTS = ("start_logits", "end_logits")
Sample = dict[str, npt.NDArray[np.int32]]


@cache
def _padded_session() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    path = default_model_path("padded", dynamic=True)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def padded_alone(sample: Sample) -> dict[str, npt.NDArray[Any]]:
    """The sample run alone through the padded model, one row exactly its length."""
    feeds = {name: sample[name][None, :] for name in ("input_ids", "token_type_ids")}
    feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    values = _padded_session().run(list(OUTPUTS), feeds)
    return {name: value[0] for name, value in zip(OUTPUTS, values, strict=True)}


def served(device: Device, samples: list[Sample], **options: Any) -> list[dict[str, Any]]:
    config = RunnerConfig(timeout_us=2_000, vocab_size=30522, max_valid_num=96, **options)
    with PackRunner(device, config) as runner:
        runner.warmup()
        return [f.result() for f in [runner.submit(s) for s in samples]]


def max_diff(samples: list[Sample], results: list[dict[str, Any]]) -> float:
    worst = 0.0
    for sample, result in zip(samples, results, strict=True):
        expected = padded_alone(sample)
        for name in OUTPUTS:
            assert result[name].shape == expected[name].shape
            worst = max(worst, float(np.abs(result[name] - expected[name]).max()))
    return worst


def dynamic_device(shapes: ShapeSet) -> OnnxDevice:
    return OnnxDevice(
        default_model_path("packed", dynamic=True),
        batch_size=16,
        seq_len=256,
        shapes=shapes,
        intra_op_num_threads=1,
    )


lengths_strategy = st.lists(
    st.one_of(st.integers(1, 24), st.integers(1, 256)), min_size=1, max_size=48
)


@pytest.mark.parametrize("shapes", [BUCKETS, DYNAMIC], ids=["buckets", "dynamic"])
@settings(max_examples=6, deadline=None)
@given(lengths=lengths_strategy)
def test_every_shape_equals_the_padded_run_alone(shapes: ShapeSet, lengths: list[int]) -> None:
    rng = np.random.default_rng(sum(lengths))
    samples = [make_sample(rng, n) for n in lengths]
    assert max_diff(samples, served(dynamic_device(shapes), samples)) <= TOLERANCE


def test_one_file_per_bucket_equals_the_padded_run_alone() -> None:
    paths = {
        shape: default_model_path("packed", batch_size=shape[0], seq_len=shape[1])
        for shape in [(16, 16), (8, 32), (4, 64)]
    }
    device = OnnxDevice(paths, intra_op_num_threads=1)
    assert device.shapes == ShapeSet.buckets(paths)
    assert (device.batch_size, device.seq_len) == (4, 64)
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, int(n)) for n in rng.integers(1, 65, size=40)]
    results = served(device, samples, batch_size=4, seq_len=64)
    assert max_diff(samples, results) <= TOLERANCE
    assert max_diff(samples, served(device.replica(), samples, batch_size=4, seq_len=64)) <= (
        TOLERANCE
    )


@pytest.mark.parametrize("shapes", [BUCKETS, DYNAMIC], ids=["buckets", "dynamic"])
def test_negative_control_the_check_bites(shapes: ShapeSet) -> None:
    rng = np.random.default_rng(7)
    samples = [make_sample(rng, int(n)) for n in rng.integers(1, 20, size=40)]
    results = served(
        # Segment ids flattened to one 0/1 mask: packed samples see each other.
        MaskRewritingDevice(dynamic_device(shapes), lambda mask: mask > 0),
        samples,
    )
    assert max_diff(samples, results) > 1e-2


def test_several_shapes_need_a_dynamic_model_or_one_file_each() -> None:
    with pytest.raises(ConfigError, match="dynamic batch and sequence axes"):
        OnnxDevice(default_model_path("packed"), shapes=BUCKETS)
    with pytest.raises(ConfigError, match="must include"):
        OnnxDevice(
            default_model_path("packed", dynamic=True),
            batch_size=8,
            seq_len=256,
            shapes=BUCKETS,
        )
    with pytest.raises(ConfigError, match="compiled for"):
        OnnxDevice({(8, 32): default_model_path("packed", batch_size=4, seq_len=32)})
