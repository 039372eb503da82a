"""The benchmark suite's building blocks, and a tiny end-to-end run of ``packrunner bench``."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from packrunner.bench.accuracy import compare_results
from packrunner.bench.dataset import poprt_dataset
from packrunner.bench.latency import percentile, summarize
from packrunner.bench.report import dump_results_csv
from packrunner.bench.suite import _knee, knee_label
from packrunner.cli import main as cli_main
from packrunner.config import PackAlgorithm
from packrunner.packing import drain_queue


def poprt_get_synthetic_data(dataset_size, avg_seq_len=128, max_seq_len=256, emb_size=30522):
    """PopRT's generator, verbatim apart from names (it seeds the global generator)."""
    np.random.seed(2023)  # noqa: NPY002
    input_len = np.random.normal(avg_seq_len, avg_seq_len, size=dataset_size).astype(np.int32)  # noqa: NPY002
    input_len = np.clip(input_len, 1, max_seq_len)
    datasets = []
    for s_len in input_len:
        input_ids = np.random.randint(0, emb_size, (s_len)).astype(np.int32)  # noqa: NPY002
        np.ones(s_len).astype(np.int32)
        token_type_ids = np.random.randint(0, 2, (s_len)).astype(np.int32)  # noqa: NPY002
        datasets.append((input_ids, token_type_ids))
    return datasets


@pytest.mark.parametrize(("n", "avg", "emb"), [(1600, 128, 30522), (50, 64, 1000)])
def test_dataset_generator_matches_poprt(n, avg, emb):
    ours = poprt_dataset(n, avg_seq_len=avg, emb_size=emb)
    theirs = poprt_get_synthetic_data(n, avg_seq_len=avg, emb_size=emb)
    assert len(ours) == len(theirs)
    for sample, (ids, types) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(sample["input_ids"], ids)
        np.testing.assert_array_equal(sample["token_type_ids"], types)
    lengths = [len(s["input_ids"]) for s in poprt_dataset(1600)]
    assert np.mean(lengths) == pytest.approx(127.807, abs=1e-3)  # published simulation figure


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile([5.0], 99) == 5.0
    assert percentile([3, 1, 2], 50) == 2  # unsorted input
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    summary = summarize(np.array([0.001, 0.002, 0.003, 0.004]), wall_s=2.0)
    assert summary.throughput == 2.0
    assert summary.avg_ms == pytest.approx(2.5)
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.max_ms == pytest.approx(4.0)


def test_mae_matches_poprt_definition_over_valid_lengths():
    expected = [{"x": np.array([1.0, 2.0, 3.0, 9.0])}, {"x": np.array([0.0, 0.0])}]
    actual = [{"x": np.array([1.5, 2.0, 2.0, -50.0])}, {"x": np.array([1.0, -1.0])}]
    report = compare_results(expected, actual, lengths=[3, 2])
    # sample 0: |.5|,0,|1| over 3 valid tokens -> 0.5; sample 1: 1, 1 -> 1.0
    assert report["x"].mean_mae == pytest.approx(0.75)
    assert report["x"].max_abs_diff == pytest.approx(1.0)  # the -50 is padding, ignored
    assert report["x"].worst_samples[0] == (1, 1.0)
    with pytest.raises(ValueError, match="2 expected results but 1"):
        compare_results(expected, actual[:1])


def test_dump_results_format_matches_poprt(tmp_path):
    path = tmp_path / "out.csv"
    results = [
        {
            "start_logits": np.array([0.5, 1.0], np.float32),
            "end_logits": np.array([2.0, 3.0], np.float32),
        },
        {"start_logits": np.array([4.0], np.float32), "end_logits": np.array([5.0], np.float32)},
    ]
    dump_results_csv(path, results, ["end_logits", "start_logits"])
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["[2.0, 3.0]", "[0.5, 1.0]"],
        ["[5.0]", "[4.0]"],
    ]  # no header, as in PopRT


def test_packrunner_bench_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["packrunner", "bench"])
    code = cli_main(
        [
            "bench",
            "--iterations", "6",
            "--repeats", "1",
            "--batch-latency-us", "2000",
            "--clients", "8",
            "--requests-per-client", "10",
            "--sweep", "0.5,1.0",
            "--sweep-seconds", "0.2",
            "--dump_results",  # PopRT's spelling, accepted as a hidden alias
            "--results-dir", str(tmp_path),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "online_lookahead" in out and "peer_batched" in out
    assert out.count("average mae: 0.0") >= 18  # every comparison, both outputs, exact on sim
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["modes"]) >= {
        "original",
        "offline_attention_mask",
        "offline_unpack_repack",
        "offline_same_plan",
        "online_padded",
        "online_unpack_repack",
        "online_next_fit",
        "online_first_fit",
        "online_lookahead",
        "peer_batched",
    }
    assert payload["modes"]["online_lookahead"]["samples_per_batch"] > 16
    # The offline run of online lookahead's own batches: the online path's cost alone.
    same_plan = payload["modes"]["offline_same_plan"]
    lookahead = drain_queue(
        [len(s["input_ids"]) for s in poprt_dataset(6 * 16)],
        algorithm=PackAlgorithm.LOOKAHEAD,
        batch_size=16,
        seq_len=256,
        max_valid_num=40,
    )
    assert same_plan["samples_per_batch"] == pytest.approx(6 * 16 / len(lookahead))
    assert payload["online_vs_offline_same_plan"] == pytest.approx(
        payload["modes"]["online_lookahead"]["samples_per_s_runs"][0]
        / same_plan["samples_per_s_runs"][0]
    )
    assert "Online lookahead vs the same batches run offline" in out
    assert payload["closed_loop"]["targets"]["online_lookahead"]["requests"] > 0
    assert payload["modes"]["online_padded"]["kind"] == "online"
    assert payload["modes"]["peer_batched"]["kind"] == "peer"
    assert payload["device_limited_ideal_samples_per_s"] > 0
    assert set(payload["knees"]) == {"online_padded", "online_lookahead", "peer_batched"}
    lengths = [len(s["input_ids"]) for s in poprt_dataset(6 * 16)]
    assert payload["token_limit_samples_per_batch"] == pytest.approx(16 * 256 / np.mean(lengths))
    for name in ("latency_cdf.png", "throughput_by_mode.png", "latency_vs_load.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert (tmp_path / "online_lookahead.csv").exists()


def test_knee_is_a_lower_bound_when_the_sweep_never_reaches_it():
    flat = [{"offered_rate": r, "p99_ms": 10.0} for r in (100, 200, 300)]
    assert _knee(flat) == {"samples_per_s": 300, "reached": False}
    assert knee_label(_knee(flat)) == "above 300 samples/s"
    bent = [*flat, {"offered_rate": 400, "p99_ms": 31.0}]
    assert _knee(bent) == {"samples_per_s": 300, "reached": True}
    assert knee_label(_knee(bent)) == "300 samples/s"
    assert _knee([]) is None


def test_bench_json_prints_the_payload_on_stdout(tmp_path, capsys):
    code = cli_main(
        [
            "bench", "--iterations", "2", "--repeats", "1", "--batch-latency-us", "500",
            "--clients", "2", "--requests-per-client", "20", "--sweep", "1.0",
            "--sweep-seconds", "0.05", "--skip-peer", "--no-plots", "--quiet", "--json",
            "--results-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads((tmp_path / "results.json").read_text())
    assert "peer_batched" not in payload["modes"]
    assert payload["args"]["sweep"] == [1.0]
