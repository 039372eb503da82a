"""Serve fixtures: the default-model server and its in-process twin (module-wide)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from packrunner import PackRunner
from packrunner.devices.onnx import OnnxDevice

from ._support import TEST_SETTINGS, ServerThread

_shared_threads: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def no_leaked_runner_threads() -> Iterator[None]:
    """As the suite-wide check, except for the runner threads of the module-wide servers."""
    yield
    leaked = [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("packrunner-") and t not in _shared_threads
    ]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    """The embedded default model (ORT, QA head + hidden state, WordPiece tokenizer)."""
    before = set(threading.enumerate())
    with ServerThread(TEST_SETTINGS) as server:
        mine = {t for t in threading.enumerate() if t.name.startswith("packrunner-")} - before
        _shared_threads.update(mine)
        yield server
    _shared_threads.difference_update(mine)


@pytest.fixture(scope="module")
def reference_runner(served: ServerThread) -> Iterator[PackRunner]:
    """The same model file and config, in process: what served outputs must equal bit for bit."""
    assert served.server is not None
    model = served.server.model
    device = model.device
    assert isinstance(device, OnnxDevice)
    before = set(threading.enumerate())
    runner = PackRunner(OnnxDevice(device.model_path, intra_op_num_threads=1), model.config)
    with runner:
        mine = {t for t in threading.enumerate() if t.name.startswith("packrunner-")} - before
        _shared_threads.update(mine)
        yield runner
    _shared_threads.difference_update(mine)
