"""The ``packrunner`` command: help, version, exit codes, --json, --model, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from packrunner import __version__
from packrunner.cli import COMMANDS, build_parser, main
from packrunner.convert import convert_file
from packrunner.models import default_model_path

FIXTURES = Path(__file__).parent / "fixtures"
# Small shapes so that every run below takes well under a second of device time.
SIM = ["--device", "sim", "--batch-latency-us", "200", "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Hugging Face export, converted to packed form at [4, 64] (vocabulary < 30522)."""
    path = tmp_path_factory.mktemp("models") / "tiny-packed.onnx"
    convert_file(FIXTURES / "tiny_hf_bert_qa.onnx", path, batch_size=4, seq_len=64)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "corrupt.onnx").write_bytes(b"\xff\xfe not a protobuf \x00" * 8)
    return {"missing": folder / "missing.onnx", **{p.stem: p for p in folder.iterdir()}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--iterations", "0"], "--iterations: must be a positive integer"),
        (["compare", "--iterations", "-1"], "--iterations: must be a positive integer"),
        (["compare", "--algorithms", "bogus"], "unknown algorithm(s) ['bogus']"),
        (["compare", "--algorithms", "padded,padded"], "listed twice"),
        (["compare", "--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["compare", "--batch_size", "x"], "--batch_size: not an integer"),
        (["compare", "--repeats", "0"], "--repeats: must be a positive integer"),
        (["bench", "--sweep", "abc"], "--sweep: not a number"),
        (["bench", "--sweep", "0.5,-1"], "--sweep: must be a positive number"),
        (["bench", "--sweep-seconds", "0"], "--sweep-seconds: must be a positive number"),
        (["bench", "--timeout-us", "-5"], "--timeout-us: must be >= 0"),
        (["bench", "--modes", "online_padded,bogus"], "unknown mode(s) ['bogus']"),
        (["bench", "--distribution", "long"], "--distribution: invalid choice"),
        (["compare", "--distribution", "long"], "--distribution: invalid choice"),
        (["compare", "--device", "sim", "--minilm"], "model options need --device onnx"),
        (["nonsense"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_values_exit_2_with_an_argparse_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("empty", "is empty, not an ONNX model"),
        ("corrupt", "is not an ONNX model"),
    ],
)
@pytest.mark.parametrize("command", ["compare --model", "compare --padded-model", "convert"])
def test_bad_model_files_exit_2(bad_files, tmp_path, kind, message, command, capsys):
    name, *flag = command.split()
    argv = [name, *flag, str(bad_files[kind])]
    if name == "convert":
        argv.append(str(tmp_path / "out.onnx"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "DecodeError" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"packrunner {__version__}"
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and ":mod:" not in text
        assert "(default: 16)" in text  # defaults are shown
        assert "--batch_size" not in text and "--max_seq_len" not in text  # aliases hidden
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


def test_poprt_spellings_are_aliases_of_the_one_flag():
    parser = build_parser()
    poprt = parser.parse_args(
        ["bench", "--batch_size", "8", "--max_seq_len", "128", "--timeout_microseconds", "5"]
    )
    ours = parser.parse_args(
        ["bench", "--batch-size", "8", "--seq-len", "128", "--timeout-us", "5"]
    )
    for name in ("batch_size", "seq_len", "timeout_us", "max_valid_num", "dump_results"):
        assert getattr(poprt, name) == getattr(ours, name), name


def test_compare_json_on_the_simulated_device(capsys):
    assert main(["compare", *SIM, "--iterations", "4", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {row["algorithm"]: row for row in payload["algorithms"]}
    assert list(rows) == ["padded", "next_fit", "first_fit", "lookahead", "stream"]
    assert payload["samples"] == 64
    assert rows["padded"]["samples_per_batch"] == 16
    assert rows["lookahead"]["queued_samples_per_batch"] > 16
    for algorithm in ("next_fit", "lookahead", "stream"):
        for output in rows[algorithm]["accuracy_vs_padded"].values():
            assert output["max_abs_diff"] == 0.0  # the simulated device is exact


def test_bench_shapes_json_on_the_simulated_device(tmp_path, capsys):
    argv = ["bench", *SIM, "--iterations", "2", "--shapes", "all", "--max-valid-num", "64"]
    assert main([*argv, "--json", "--results-dir", str(tmp_path)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["samples"] == 32
    for label in ("seed", "short"):
        rows = payload["distributions"][label]
        assert list(rows) == ["padded", "packed", "shapes_buckets", "shapes_dynamic"]
        assert rows["padded"]["samples_per_batch"] == 16
        for row in rows.values():
            assert row["samples_per_s"] > 0 and 0 < row["token_fill"] <= 1
    assert json.loads((tmp_path / "shapes.json").read_text()) == payload


def test_compare_model_runs_against_its_own_padded_form(tiny_packed, capsys):
    shape = ["--batch-size", "4", "--seq-len", "64", "--avg-seq-len", "32", "--quiet"]
    argv = ["compare", "--model", str(tiny_packed), *shape, "--iterations", "3", "--repeats", "1"]
    assert main([*argv, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["models"] == {"packed": str(tiny_packed), "padded": str(tiny_packed)}
    rows = {row["algorithm"]: row for row in payload["algorithms"]}
    assert "stream" not in rows  # no unpack/repack model given: skipped, and said so
    assert "stream skipped" in payload["title"]
    # The fixture's vocabulary is far below the default --emb-size: ids were drawn below it.
    for output in rows["lookahead"]["accuracy_vs_padded"].values():
        assert output["max_abs_diff"] < 1e-4
    # Negative control: another model's padded form gives large errors, so the check bites.
    other = default_model_path("padded", batch_size=4, seq_len=64, max_valid_num=40)
    assert main([*argv, "--padded-model", str(other), "--json"]) == 0
    rows = {row["algorithm"]: row for row in json.loads(capsys.readouterr().out)["algorithms"]}
    assert max(o["max_abs_diff"] for o in rows["lookahead"]["accuracy_vs_padded"].values()) > 0.1


def test_compare_model_with_a_shape_that_does_not_fit_exits_2(tiny_packed, capsys):
    assert main(["compare", "--model", str(tiny_packed), "--quiet"]) == 2
    assert "runner config is [batch_size=16, seq_len=256]" in capsys.readouterr().err
    argv = ["compare", "--model", str(tiny_packed), "--batch-size", "4", "--seq-len", "64"]
    assert main([*argv, "--algorithms", "stream"]) == 2
    assert "needs --unpack-repack-model" in capsys.readouterr().err


def test_a_missing_extra_is_named(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] or ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)  # import rich(.x) -> ModuleNotFoundError
    argv = ["bench", *SIM, "--iterations", "1", "--results-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pip install 'packrunner[bench]'" in err and "Traceback" not in err


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    # A run long enough to be interrupted: 100 batches at 50 ms each per algorithm and round.
    command = [sys.executable, "-m", "packrunner.cli", "compare", "--device", "sim"]
    command += ["--batch-latency-us", "50000", "--iterations", "100"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stderr is not None
        first_line = process.stderr.readline()  # the run has started
        assert "runs" in first_line
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
