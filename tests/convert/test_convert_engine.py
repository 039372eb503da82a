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
from tests._support import Sample, token_samples

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


@pytest.mark.parametrize("fixture", ["tiny_hf_roberta_sdpa", "tiny_hf_roberta_posids"])
def test_engine_feeds_roberta_positions(tmp_path: Path, fixture: str) -> None:
    # The runner feeds 0..L-1 per sample whatever the kind: the converted graph adds RoBERTa's
    # padding_idx + 1 itself, so positions up to seq_len are all the runner ever checks or sends.
    model_path = tmp_path / "packed.onnx"
    convert_file(fixture_path(fixture), model_path, batch_size=4, seq_len=64)
    rng = np.random.default_rng(12)
    lengths = [64, 1, 63, *(int(n) for n in rng.integers(1, 65, size=17))]
    ids = [rng.integers(2, 128, size=n).astype(np.int32) for n in lengths]  # no pad token (1)
    config = RunnerConfig(
        algorithm=PackAlgorithm.FIRST_FIT, batch_size=4, seq_len=64, timeout_us=2_000
    )
    with PackRunner(OnnxDevice(model_path, intra_op_num_threads=2), config) as runner:
        results = [runner.submit({"input_ids": sample}) for sample in ids]
        outputs = [future.result(timeout=60) for future in results]
    original = make_session(fixture_path(fixture))
    for sample, result in zip(ids, outputs, strict=True):
        reference = run_single(
            original,
            Sample(sample.astype(np.int32), np.zeros(len(sample), np.int32)),
            position_offset=2,
        )
        np.testing.assert_allclose(
            result["last_hidden_state"], reference["last_hidden_state"][0], rtol=0, atol=1e-5
        )
