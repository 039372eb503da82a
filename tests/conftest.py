from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests._support import SteppedDevice


@pytest.fixture(autouse=True)
def no_leaked_runner_threads() -> Iterator[None]:
    """Every test must leave no packrunner thread running (close() joins them all)."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("packrunner-")]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(autouse=True, scope="session")
def isolated_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Built default models go to a per-session folder, not the user's ~/.cache."""
    import os

    previous = os.environ.get("PACKRUNNER_CACHE")
    os.environ["PACKRUNNER_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if previous is None:
        os.environ.pop("PACKRUNNER_CACHE", None)
    else:
        os.environ["PACKRUNNER_CACHE"] = previous


@pytest.fixture
def stepped_device() -> Iterator[SteppedDevice]:
    """A device that runs one batch per ``allow.release()``; released fully at teardown."""
    device = SteppedDevice()
    yield device
    device.release_all()
