"""Fixtures for the compat tests: tiny default models in a private cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from packrunner.models import Variant, default_model_path

from ._support import BATCH_SIZE, MAX_VALID_NUM, SEQ_LEN, PaddedReference


@pytest.fixture(scope="session")
def compat_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model cache, so tests never touch (or depend on) ~/.cache/packrunner."""
    return tmp_path_factory.mktemp("compat-models")


def _small(variant: Variant, cache: Path) -> Path:
    return default_model_path(
        variant,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
        max_valid_num=MAX_VALID_NUM,
        cache_dir=cache,
    )


@pytest.fixture(scope="session")
def packed_model(compat_cache: Path) -> Path:
    """Attention-mask (single-row) model, [2, 16]."""
    return _small("packed", compat_cache)


@pytest.fixture(scope="session")
def unpack_repack_model(compat_cache: Path) -> Path:
    """Across-rows model taking unpack_info [6], [2, 16]."""
    return _small("unpack_repack", compat_cache)


@pytest.fixture(scope="session")
def padded_model(compat_cache: Path) -> Path:
    """Padded model (no position_ids input), [2, 16]."""
    return _small("padded", compat_cache)


@pytest.fixture(scope="session")
def reference(padded_model: Path) -> PaddedReference:
    """Per-sample ground-truth logits from the padded model."""
    return PaddedReference(padded_model)
