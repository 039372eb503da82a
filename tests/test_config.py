from __future__ import annotations

import dataclasses

import pytest

import packrunner
from packrunner import ConfigError, PackAlgorithm, RunnerConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("seq_len", -1, "seq_len must be >= 1, got -1"),
        ("timeout_us", -5, "timeout_us must be >= 0, got -5"),
        ("max_valid_num", 0, "max_valid_num must be >= 1, got 0"),
        ("batch_size", True, "batch_size must be an int, got True"),
        ("timeout_us", 1.5, "timeout_us must be an int, got 1.5"),
        ("max_queue_size", 0, "max_queue_size must be >= 1, got 0"),
        ("max_inflight_batches", 0, "max_inflight_batches must be >= 1, got 0"),
        ("vocab_size", 0, "vocab_size must be >= 1, got 0"),
        ("algorithm", "best", "algorithm must be one of"),
        ("dynamic_input_name", "", "dynamic_input_name must be a non-empty string"),
        ("mask_input_name", "input_ids", "input names must be distinct"),
    ],
)
def test_invalid_config_names_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RunnerConfig(**{field: value})


def test_defaults_and_frozen():
    config = RunnerConfig()
    assert (config.batch_size, config.seq_len, config.timeout_us, config.max_valid_num) == (
        16,
        256,
        15_000,
        40,
    )
    assert config.algorithm is PackAlgorithm.LOOKAHEAD
    assert RunnerConfig(algorithm="first_fit").algorithm is PackAlgorithm.FIRST_FIT  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 8  # type: ignore[misc]


def test_public_api_is_sorted_and_complete():
    assert packrunner.__all__ == sorted(packrunner.__all__)
    for name in packrunner.__all__:
        assert hasattr(packrunner, name), name
    assert issubclass(packrunner.InvalidSampleError, packrunner.PackRunnerError)
    assert issubclass(packrunner.DeviceError, packrunner.PackRunnerError)
