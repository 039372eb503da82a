"""The converter's output runs under packrunner's own engine (PackRunner + OnnxDevice).

The other tests feed the converted graphs with this directory's reference packer; this one checks
the contract with the engine: a packed model under the row-packing algorithms and an unpack/repack
model under ``algorithm=stream``, each sample's result equal to the unconverted
fixture run on that sample alone.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest

from packrunner import InputForm, PackRunner, RunnerConfig
from packrunner.config import PackAlgorithm
from packrunner.convert import convert_file
from packrunner.devices.onnx import OnnxDevice
from tests._support import token_samples

from ._support import fixture_path, make_session, run_single


@pytest.mark.parametrize(
    ("form", "algorithm"),
    [
        (InputForm.PACKED, PackAlgorithm.LOOKAHEAD),
        (InputForm.PACKED, PackAlgorithm.FIRST_FIT),
        (InputForm.UNPACK_REPACK, PackAlgorithm.STREAM),
    ],
)
def test_engine_runs_converted_model(
    tmp_path: Path, form: InputForm, algorithm: PackAlgorithm
) -> None:
    model_path = tmp_path / "packed.onnx"
    convert_file(fixture_path("tiny_hf_bert_qa"), model_path, form=form)
    rng = np.random.default_rng(11)
    samples = token_samples(rng, [int(n) for n in rng.integers(1, 257, size=40)], 128)
    config = RunnerConfig(algorithm=algorithm, timeout_us=2_000)
    with (
        PackRunner(OnnxDevice(model_path, intra_op_num_threads=2), config) as runner,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        results = list(
            pool.map(
                lambda s: runner.execute(
                    {
                        "input_ids": s.input_ids.astype(np.int32),
                        "token_type_ids": s.token_type_ids.astype(np.int32),
                    },
                    timeout=60,
                ),
                samples,
            )
        )
    original = make_session(fixture_path("tiny_hf_bert_qa"))
    for sample, result in zip(samples, results, strict=True):
        reference = run_single(original, sample)
        for name in ("start_logits", "end_logits"):
            assert result[name].shape == (sample.length,)
            np.testing.assert_allclose(result[name], reference[name][0], rtol=0, atol=1e-5)
