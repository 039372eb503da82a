"""Fixtures for the compat tests: tiny default models in a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from packrunner import InputForm
from packrunner.models import default_model_path

from ._support import BATCH_SIZE, MAX_VALID_NUM, SEQ_LEN, PaddedReference


@pytest.fixture(scope="session")
def compat_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model cache, so tests never touch (or depend on) ~/.cache/packrunner."""
    return tmp_path_factory.mktemp("compat-models")


def _small(form: InputForm, cache: Path) -> Path:
    return default_model_path(
        form,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
        max_valid_num=MAX_VALID_NUM,
        cache_dir=cache,
    )


@pytest.fixture(scope="session")
def packed_model(compat_cache: Path) -> Path:
    """Packed (single-row) model, [2, 16]."""
    return _small(InputForm.PACKED, compat_cache)


@pytest.fixture(scope="session")
def unpack_repack_model(compat_cache: Path) -> Path:
    """Across-rows model taking unpack_info [6], [2, 16]."""
    return _small(InputForm.UNPACK_REPACK, compat_cache)


@pytest.fixture(scope="session")
def padded_model(compat_cache: Path) -> Path:
    """Padded model (no position_ids input), [2, 16]."""
    return _small(InputForm.PADDED, compat_cache)


@pytest.fixture(scope="session")
def reference(padded_model: Path) -> PaddedReference:
    """Per-sample ground-truth logits from the padded model."""
    return PaddedReference(padded_model)
