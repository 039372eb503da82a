"""OnnxDevice on the default model: every mode equals the padded model, through the runner."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from packrunner import (
    ConfigError,
    Device,
    DeviceError,
    InvalidSampleError,
    OutputLayout,
    PackAlgorithm,
    PackRunner,
    RunnerConfig,
)
from packrunner.bench.accuracy import compare_results
from packrunner.bench.dataset import poprt_dataset
from packrunner.devices.onnx import OnnxDevice
from packrunner.models import default_model_path

SAMPLES = poprt_dataset(160)  # PopRT's generator: ids in [0, 30522), types 0/1
LENGTHS = [len(s["input_ids"]) for s in SAMPLES]


async def run_all(
    device: Device, algorithm: PackAlgorithm, samples=SAMPLES
) -> list[dict[str, Any]]:
    config = RunnerConfig(algorithm=algorithm, timeout_us=1_000, vocab_size=30522)
    async with PackRunner(device, config) as runner:
        return await asyncio.gather(*(runner.execute_async(s) for s in samples))


@pytest.fixture(scope="module")
def padded_results() -> list[dict[str, Any]]:
    return asyncio.run(run_all(OnnxDevice(default_model_path("padded")), PackAlgorithm.PADDED))


@pytest.mark.parametrize(
    ("form", "algorithm"),
    [
        ("packed", PackAlgorithm.LOOKAHEAD),
        ("packed", PackAlgorithm.FIRST_FIT),
        ("packed", PackAlgorithm.NEXT_FIT),
        ("packed", PackAlgorithm.PADDED),
        ("unpack_repack", PackAlgorithm.STREAM),
    ],
)
async def test_every_mode_equals_the_padded_model(padded_results, form, algorithm):
    device = OnnxDevice(default_model_path(form))
    results = await run_all(device, algorithm)
    report = compare_results(padded_results, results, LENGTHS)
    for name in ("start_logits", "end_logits"):
        assert report[name].max_abs_diff <= 1e-5, (name, report[name])
        assert report[name].mean_mae <= 1e-6
    for result, length in zip(results, LENGTHS, strict=True):
        assert result["start_logits"].shape == (length,)


class PlainMaskDevice(Device):
    """Negative control: the packed model fed a plain 0/1 mask (no block diagonal)."""

    def __init__(self, inner: OnnxDevice) -> None:
        self.inner = inner

    @property
    def input_specs(self):
        return self.inner.input_specs

    @property
    def output_specs(self):
        return self.inner.output_specs

    def open(self) -> None:
        self.inner.open()

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        plain = dict(feeds, attention_mask=(feeds["attention_mask"] > 0).astype(np.int32))
        return self.inner.run(plain)


async def test_negative_control_plain_mask_differs(padded_results):
    device = PlainMaskDevice(OnnxDevice(default_model_path("packed")))
    results = await run_all(device, PackAlgorithm.LOOKAHEAD)
    report = compare_results(padded_results, results, LENGTHS)
    assert report["start_logits"].max_abs_diff > 1e-2


def test_model_that_does_not_match_the_config_is_refused():
    device = OnnxDevice(default_model_path("packed"))
    assert (device.batch_size, device.seq_len) == (16, 256)
    with pytest.raises(ConfigError, match="seq_len=128"):
        PackRunner(device, RunnerConfig(seq_len=128))
    with pytest.raises(ConfigError, match="use algorithm=stream"):
        PackRunner(OnnxDevice(default_model_path("unpack_repack")), RunnerConfig())
    with pytest.raises(ConfigError, match="needs a 'position_ids'"):
        PackRunner(OnnxDevice(default_model_path("padded")), RunnerConfig())
    with pytest.raises(ConfigError, match="compiled for 256"):
        OnnxDevice(default_model_path("packed"), seq_len=128)


def _tiny_model(
    path: Path,
    *,
    dims: list[Any],
    elem: int = TensorProto.INT32,
    op: str = "Identity",
    domain: str = "",
) -> Path:
    x = helper.make_tensor_value_info("input_ids", elem, dims)
    y = helper.make_tensor_value_info("y", elem, dims)
    node = helper.make_node(op, ["input_ids"], ["y"], domain=domain)
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)
    onnx.save(model, path)
    return path


def test_symbolic_or_non_integer_inputs_are_refused(tmp_path):
    symbolic = _tiny_model(tmp_path / "dyn.onnx", dims=["batch", "seq"])
    with pytest.raises(ConfigError, match="symbolic dim 'batch'"):
        OnnxDevice(symbolic)
    fixed = OnnxDevice(symbolic, batch_size=2, seq_len=8)
    assert fixed.input_specs["input_ids"].shape == (2, 8)
    assert fixed.output_specs["y"].layout is OutputLayout.PACKED_TOKENS
    floats = _tiny_model(tmp_path / "f.onnx", dims=[2, 8], elem=TensorProto.FLOAT)
    with pytest.raises(ConfigError, match="FLOAT"):
        OnnxDevice(floats)
    with pytest.raises(ConfigError, match="not a file"):
        OnnxDevice(tmp_path / "missing.onnx")


def test_missing_empty_or_corrupt_files_are_refused_with_config_error(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "corrupt.onnx").write_bytes(b"\xff\xfe not a protobuf \x00" * 8)
    cases = {"missing": "is not a file", "empty": "is empty", "corrupt": "is not an ONNX model"}
    for stem, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            OnnxDevice(tmp_path / f"{stem}.onnx")


@pytest.mark.parametrize(("allow_spinning", "entry"), [(None, "0"), (False, "0"), (True, "1")])
def test_intra_op_threads_sleep_unless_spinning_is_asked_for(
    allow_spinning: bool | None, entry: str
) -> None:
    """onnxruntime spins by default; OnnxDevice's sessions do not unless told to."""
    path = default_model_path("packed")
    device = (
        OnnxDevice(path)
        if allow_spinning is None
        else OnnxDevice(path, allow_spinning=allow_spinning)
    )
    device.open()
    try:
        options = device._session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
        assert device.replica().allow_spinning is device.allow_spinning
    finally:
        device.close()


def test_session_that_cannot_load_fails_start(tmp_path):
    bogus = _tiny_model(tmp_path / "custom.onnx", dims=[2, 8], op="NoSuchOp", domain="acme")
    device = OnnxDevice(bogus)
    runner = PackRunner(
        device, RunnerConfig(batch_size=2, seq_len=8, algorithm=PackAlgorithm.PADDED)
    )
    with pytest.raises(DeviceError, match="failed to open"):
        runner.start()


async def test_ids_beyond_the_models_vocabulary_are_refused_at_submit():
    device = OnnxDevice(default_model_path("packed"))
    limits = {"input_ids": 30522, "token_type_ids": 2, "position_ids": 512}
    assert device.input_value_limits == limits
    async with PackRunner(device, RunnerConfig()) as runner:  # no vocab_size in the config
        with pytest.raises(InvalidSampleError, match="must be < 30522"):
            runner.execute_async({"input_ids": np.array([1, 30522], dtype=np.int32)})


class CorruptingDevice(OnnxDevice):
    """Hands onnxruntime a wrongly typed feed whenever a batch holds the poison id."""

    POISON = 7

    def run(self, feeds):
        if bool((feeds["input_ids"] == self.POISON).any()):
            feeds = dict(feeds, input_ids=feeds["input_ids"].astype(np.float32))
        return super().run(feeds)


async def test_onnxruntime_failure_fails_only_its_batch():
    device = CorruptingDevice(default_model_path("padded"), intra_op_num_threads=1)
    config = RunnerConfig(algorithm=PackAlgorithm.PADDED, timeout_us=1_000)
    clean = [s for s in SAMPLES if CorruptingDevice.POISON not in s["input_ids"]][:20]
    async with PackRunner(device, config) as runner:
        outcomes = await asyncio.gather(
            runner.execute_async({"input_ids": np.array([7, 8], dtype=np.int32)}),
            *(runner.execute_async(s) for s in clean),
            return_exceptions=True,
        )
        after = await runner.execute_async(clean[0])
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(outcomes[0], DeviceError) and "onnxruntime" in str(outcomes[0])
    assert isinstance(outcomes[0].__cause__, DeviceError)  # OnnxDevice's own, cause chained
    assert len(failed) == 16, "only the poisoned sample's batch (16 padded rows) fails"
    assert after["start_logits"].shape == (len(clean[0]["input_ids"]),)


async def test_dynamically_quantized_model_is_refused_and_would_leak(tmp_path, padded_results):
    """Dynamic int8 quantization scales each batch as a whole: refused, and for good reason."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = tmp_path / "packed-int8.onnx"
    quantize_dynamic(str(default_model_path("packed")), str(quantized), weight_type=QuantType.QInt8)
    with pytest.raises(ConfigError, match="DynamicQuantizeLinear"):
        OnnxDevice(quantized)
    # Opting in runs it, but a sample's logits now depend on its batch mates: the same samples
    # packed differently (lookahead vs first_fit) disagree far beyond fp32 noise.
    device = OnnxDevice(quantized, allow_batch_coupling_ops=True)
    lookahead = await run_all(device, PackAlgorithm.LOOKAHEAD)
    first_fit = await run_all(
        OnnxDevice(quantized, allow_batch_coupling_ops=True), PackAlgorithm.FIRST_FIT
    )
    report = compare_results(lookahead, first_fit, LENGTHS)
    assert report["start_logits"].max_abs_diff > 1e-4
