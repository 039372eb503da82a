"""Shared fixtures for the model tests: default models, diff summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from packrunner import InputForm
from packrunner.models import (
    DEFAULT_CONFIG,
    BertWeights,
    Head,
    default_model_path,
    random_bert_weights,
)

from ._support import MAX_DIFFS, OrtModel


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the measured max abs differences, so each run documents its actual margins."""
    if not MAX_DIFFS:
        return
    terminalreporter.section("packrunner.models: measured max abs differences")
    for label in sorted(MAX_DIFFS):
        terminalreporter.write_line(f"{label:<64} {MAX_DIFFS[label]:.3e}")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache dir, so tests never touch (or depend on) the user's ~/.cache."""
    return tmp_path_factory.mktemp("packrunner-cache")


@pytest.fixture(scope="session")
def default_weights() -> BertWeights:
    """The weights every default model is built from."""
    return random_bert_weights(DEFAULT_CONFIG, seed=0)


@pytest.fixture(scope="session")
def default_model(model_cache_dir: Path) -> Callable[[InputForm, Head], OrtModel]:
    """Session factory for the default ``[16, 256]``, ``max_valid_num=40`` models."""
    sessions: dict[tuple[str, str], OrtModel] = {}

    def get(form: InputForm, head: Head) -> OrtModel:
        if (form, head) not in sessions:
            path = default_model_path(form, head=head, cache_dir=model_cache_dir)
            sessions[form, head] = OrtModel(path)
        return sessions[form, head]

    return get
