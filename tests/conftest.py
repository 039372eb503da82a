from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_leaked_runner_threads() -> Iterator[None]:
    """Every test must leave no packrunner thread running (close() joins them all)."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("packrunner-")]
    assert not leaked, f"threads left running: {leaked}"
