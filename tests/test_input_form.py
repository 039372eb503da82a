"""InputForm: the one vocabulary for a model's input form, its mapping to algorithms, and the
SimulatedDevice compiled for each form."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from packrunner import (
    ConfigError,
    InputForm,
    PackAlgorithm,
    PackRunner,
    RunnerConfig,
    SimulatedDevice,
)
from tests._support import assert_matches_reference, random_samples


def test_members_are_their_string_values() -> None:
    assert [form.value for form in InputForm] == ["packed", "padded", "unpack_repack"]
    assert str(InputForm.PACKED) == "packed"
    assert InputForm("packed") is InputForm.PACKED
    assert f"bert-{InputForm.UNPACK_REPACK}" == "bert-unpack_repack"


@pytest.mark.parametrize(
    ("algorithm", "form"),
    [
        (PackAlgorithm.PADDED, InputForm.PADDED),
        (PackAlgorithm.NEXT_FIT, InputForm.PACKED),
        (PackAlgorithm.FIRST_FIT, InputForm.PACKED),
        (PackAlgorithm.LOOKAHEAD, InputForm.PACKED),
        (PackAlgorithm.STREAM, InputForm.UNPACK_REPACK),
    ],
)
def test_the_form_each_algorithm_needs(algorithm: PackAlgorithm, form: InputForm) -> None:
    assert InputForm.for_algorithm(algorithm) is form


@pytest.mark.parametrize("form", list(InputForm))
def test_default_algorithm_is_the_inverse_mapping(form: InputForm) -> None:
    assert InputForm.for_algorithm(form.default_algorithm) is form


def test_parse_takes_members_and_values_only() -> None:
    assert InputForm.parse("padded") is InputForm.PADDED
    assert InputForm.parse(InputForm.PACKED) is InputForm.PACKED
    with pytest.raises(ValueError, match="form must be one of 'packed', 'padded', 'unpack_repack'"):
        InputForm.parse("attention_mask")


@pytest.mark.parametrize(
    ("legacy", "form"),
    [
        ("block_diagonal", InputForm.PACKED),
        ("padding", InputForm.PADDED),
        ("unpack_repack", InputForm.UNPACK_REPACK),
        ("packed", InputForm.PACKED),
    ],
)
def test_legacy_spellings_map_once(legacy: str, form: InputForm) -> None:
    assert InputForm.from_legacy(legacy, what="--attention") is form


def test_simulated_device_inputs_per_form() -> None:
    def inputs(form: InputForm) -> list[str]:
        return sorted(SimulatedDevice(form=form, batch_latency_us=0).input_specs)

    assert inputs(InputForm.PACKED) == [
        "attention_mask",
        "input_ids",
        "position_ids",
        "token_type_ids",
    ]
    assert inputs(InputForm.PADDED) == ["attention_mask", "input_ids", "token_type_ids"]
    assert inputs(InputForm.UNPACK_REPACK) == [
        "input_ids",
        "position_ids",
        "token_type_ids",
        "unpack_info",
    ]


def test_simulated_device_takes_only_the_form_vocabulary() -> None:
    assert SimulatedDevice(form="unpack_repack").form is InputForm.UNPACK_REPACK
    with pytest.raises(ValueError, match="form must be one of"):
        SimulatedDevice(form="attention_mask")


@pytest.mark.parametrize("form", list(InputForm))
def test_each_form_runs_its_default_algorithm_exactly(form: InputForm) -> None:
    samples = random_samples(300, seed=5)
    config = RunnerConfig(algorithm=form.default_algorithm, timeout_us=1_000)

    async def run_all() -> list[dict[str, np.ndarray]]:
        device = SimulatedDevice(form=form, batch_latency_us=0)
        async with PackRunner(device, config) as runner:
            return list(await asyncio.gather(*(runner.execute_async(s) for s in samples)))

    for sample, result in zip(samples, asyncio.run(run_all()), strict=True):
        assert_matches_reference(sample, result)


def test_padded_device_refuses_packed_batches() -> None:
    # Negative controls: a padded model cannot take several samples per row, whether the runner
    # is asked to pack (no position_ids input) or a packed batch reaches the device.
    device = SimulatedDevice(form=InputForm.PADDED, batch_latency_us=0, batch_size=2, seq_len=8)
    with pytest.raises(ConfigError, match="position_ids"):
        PackRunner(device, RunnerConfig(batch_size=2, seq_len=8, algorithm=PackAlgorithm.LOOKAHEAD))
    feeds = {name: np.zeros((2, 8), dtype=np.int32) for name in device.input_specs}
    feeds["attention_mask"][0] = [1, 1, 2, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="0/1 mask"):
        device.run(feeds)
