"""OnnxDevice under the reliability machinery: replicas after a hang, ids read as sent."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from packrunner import (
    DeviceTimeoutError,
    InvalidSampleError,
    PackAlgorithm,
    PackRunner,
    RunnerConfig,
)
from packrunner.devices.onnx import OnnxDevice

CONFIG = RunnerConfig(
    batch_size=2, seq_len=8, max_valid_num=2, algorithm=PackAlgorithm.PADDED, timeout_us=0
)


def identity_model(path: Path) -> Path:
    """y = input_ids, [2, 8] int32: results show exactly which ids reached the session."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT32, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class HangsOnce(OnnxDevice):
    """Its first run blocks until released; its replica is a plain OnnxDevice."""

    def __init__(self, path: Path, release: threading.Event, hanging: threading.Event) -> None:
        super().__init__(path, intra_op_num_threads=1)
        self.release, self.hanging = release, hanging

    def run(self, feeds: Any) -> Any:
        if not self.hanging.is_set():
            self.hanging.set()
            self.release.wait()
        return super().run(feeds)


def test_a_hung_onnx_session_is_replaced_by_an_identical_one(tmp_path: Path) -> None:
    release, hanging = threading.Event(), threading.Event()
    device = HangsOnce(identity_model(tmp_path / "identity.onnx"), release, hanging)
    replica = device.replica()
    assert type(replica) is OnnxDevice
    assert replica.input_specs == device.input_specs
    assert replica.output_specs == device.output_specs
    config = dataclasses.replace(CONFIG, device_timeout_s=0.3)
    try:
        with PackRunner(device, config) as runner:
            with pytest.raises(DeviceTimeoutError):
                runner.execute({"input_ids": [1, 2]})
            result = runner.execute({"input_ids": np.array([3, 4, 5], ">i2")}, timeout=30)
            np.testing.assert_array_equal(result["y"], [3, 4, 5])
            assert runner.stats().devices_replaced == 1
    finally:
        release.set()
        for thread in threading.enumerate():
            if thread.name.startswith("packrunner-"):
                thread.join(10)


@pytest.mark.parametrize(
    "ids", [np.array([5, -1], np.int8), np.array([5, -300], np.int16), [5, -1]]
)
def test_negative_ids_never_reach_the_session(tmp_path: Path, ids: object) -> None:
    """onnxruntime's Gather would wrap a negative id to the end of the table."""
    device = OnnxDevice(identity_model(tmp_path / "identity.onnx"), intra_op_num_threads=1)
    with PackRunner(device, CONFIG) as runner:
        with pytest.raises(InvalidSampleError, match="negative value"):
            runner.execute({"input_ids": ids})
        np.testing.assert_array_equal(runner.execute({"input_ids": [5, 6]})["y"], [5, 6])
