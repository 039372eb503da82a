"""packrunner.compat.backend.get_session: whole-batch sessions and the PopEF export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from packrunner import ConfigError, InvalidSampleError, RunnerNotStartedError
from packrunner.compat import poprt_runtime as runtime
from packrunner.compat.backend import POPEF_NAME, get_session
from packrunner.compat.packing_utils import pack_data

from ._support import (
    BATCH_SIZE,
    MAX_VALID_NUM,
    OUTPUTS,
    SEQ_LEN,
    TOLERANCE,
    PaddedReference,
    make_samples,
)


def padded_feeds(lengths: list[int]) -> dict[str, np.ndarray]:
    samples = make_samples(lengths, seed=11)
    feeds = {
        name: np.zeros((BATCH_SIZE, SEQ_LEN), dtype=np.int32)
        for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    }
    for row, sample in enumerate(samples):
        for name, values in sample.feeds().items():
            feeds[name][row, : sample.input_len] = values
    return feeds


def test_run_returns_outputs_in_the_order_asked(padded_model: Path) -> None:
    sess = get_session(str(padded_model), 1, "poprt").load()
    assert sess.load() is sess  # idempotent
    feeds = padded_feeds([5, 16])
    # PopRT's example feeds position_ids to the padded model, which does not take them: dropped.
    end, start = sess.run(["end_logits", "start_logits"], feeds)
    assert end.shape == start.shape == (BATCH_SIZE, SEQ_LEN)
    start_again, end_again = sess.run(None, feeds)
    np.testing.assert_array_equal(start, start_again)
    np.testing.assert_array_equal(end, end_again)
    # int64 feeds are cast to the model's int32.
    wide = {name: value.astype(np.int64) for name, value in feeds.items()}
    np.testing.assert_array_equal(sess.run(["start_logits"], wide)[0], start)
    inputs, outputs = sess.get_io_info()
    assert inputs["input_ids"] == ((BATCH_SIZE, SEQ_LEN), np.dtype(np.int32))
    assert set(outputs) == set(OUTPUTS)


def test_run_errors(padded_model: Path) -> None:
    sess = get_session(padded_model)
    with pytest.raises(RunnerNotStartedError, match="load"):
        sess.run(None, padded_feeds([3]))
    sess.load()
    feeds = padded_feeds([3])
    with pytest.raises(InvalidSampleError, match="unknown output"):
        sess.run(["logits"], feeds)
    with pytest.raises(InvalidSampleError, match="missing input"):
        sess.run(None, {"input_ids": feeds["input_ids"]})
    with pytest.raises(InvalidSampleError, match="shape"):
        sess.run(None, {**feeds, "input_ids": feeds["input_ids"][:, :8]})
    with pytest.raises(InvalidSampleError, match="dtype"):
        sess.run(None, {**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
    with pytest.raises(ConfigError, match="backend"):
        get_session(padded_model, 1, "tensorrt")
    with pytest.raises(ConfigError, match="num_ipus"):
        get_session(padded_model, 0)
    with pytest.raises(ConfigError, match="not a file"):
        get_session("missing.onnx")


def test_export_is_the_model_and_runner_accepts_it(
    packed_model: Path, tmp_path: Path, reference: PaddedReference
) -> None:
    sess = get_session(packed_model, 1, "poprt", output_dir=tmp_path / "out", export_popef=True)
    assert sess.popef_path is None
    sess.load()
    popef = tmp_path / "out" / POPEF_NAME
    assert sess.popef_path == popef
    assert popef.read_bytes() == packed_model.read_bytes()
    assert [p.name for p in popef.parent.iterdir()] == [POPEF_NAME]  # no temporary left over
    # Exporting again replaces the file atomically.
    get_session(packed_model.read_bytes(), output_dir=popef.parent, export_popef=True).load()
    assert popef.read_bytes() == packed_model.read_bytes()

    config = runtime.PackRunnerConfig(timeout_microseconds=1000)
    config.enable_input_single_row_mode("attention_mask")
    (sample,) = make_samples([7])
    out = {"start_logits": np.zeros(SEQ_LEN, np.float32)}
    with runtime.Runner(str(popef), config) as runner:
        runner.execute(sample.feeds(), out)
    np.testing.assert_allclose(
        out["start_logits"][:7], reference(sample)["start_logits"], atol=TOLERANCE
    )


def test_export_defaults_to_the_working_directory(
    packed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    get_session(packed_model, export_popef=True).load()
    assert (tmp_path / POPEF_NAME).is_file()
    assert os.path.samefile(tmp_path / POPEF_NAME, packed_model) or (
        (tmp_path / POPEF_NAME).read_bytes() == packed_model.read_bytes()
    )


@pytest.mark.parametrize("across_rows", [False, True])
def test_offline_pack_data_runs_on_the_session(
    packed_model: Path,
    unpack_repack_model: Path,
    reference: PaddedReference,
    across_rows: bool,
) -> None:
    # PopRT's offline path: pack_data -> sess.run on the packed batch -> cut per sample.
    samples = make_samples([9, 5, 16, 3, 7, 2], seed=12)
    model = unpack_repack_model if across_rows else packed_model
    sess = get_session(model, 1, "poprt").load()
    transfer = pack_data(samples, 0, BATCH_SIZE, SEQ_LEN, MAX_VALID_NUM, 1, across_rows)
    assert transfer.count > 1
    # PopRT's example passes the [max_valid_num, 1] unpack_info and the attention mask to both
    # models.
    feeds = {**transfer.data, "unpack_info": transfer.unpack_info}
    if not across_rows:
        feeds.pop("unpack_info")
    start, end = sess.run(list(OUTPUTS), feeds)
    for k, spec in enumerate(transfer.specs):
        sample = samples[spec.id]
        if across_rows:  # slot k holds sample k from position 0
            got = start[k, : spec.l]
        else:  # the sample ends at (row, col) of the batch
            got = start[spec.row, spec.col - spec.l : spec.col]
        np.testing.assert_allclose(got, reference(sample)["start_logits"], atol=TOLERANCE)
    assert end.shape == start.shape
