"""default_model_path: builds once, keys files by every parameter, writes atomically."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnx
import pytest

from packrunner.models import CACHE_ENV_VAR, default_cache_dir, default_model_path, input_names


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    first = default_model_path(
        "padded", batch_size=2, seq_len=16, head="encoder", cache_dir=tmp_path
    )
    assert first.is_file() and first.parent == tmp_path.absolute()
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))  # make a rewrite detectable
    again = default_model_path(
        "padded", batch_size=2, seq_len=16, head="encoder", cache_dir=tmp_path
    )
    assert again == first
    assert again.stat().st_mtime_ns == stamp - 10**9
    model = onnx.load(str(first))
    onnx.checker.check_model(model, full_check=True)
    assert tuple(i.name for i in model.graph.input) == input_names("padded")


def test_every_parameter_changes_the_file(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "batch_size": 2,
        "seq_len": 16,
        "max_valid_num": 4,
        "cache_dir": tmp_path,
    }
    paths = {
        default_model_path("packed", **base),
        default_model_path("padded", **base),
        default_model_path("unpack_repack", **base),
        default_model_path("packed", head="encoder", **base),
        default_model_path("packed", batch_size=3, seq_len=16, max_valid_num=4, cache_dir=tmp_path),
        default_model_path("packed", batch_size=2, seq_len=32, max_valid_num=4, cache_dir=tmp_path),
        default_model_path("packed", batch_size=2, seq_len=16, max_valid_num=5, cache_dir=tmp_path),
        default_model_path("packed", dynamic=True, **base),
    }
    assert len(paths) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    path = default_model_path("packed", batch_size=1, seq_len=8)
    assert path.parent == (tmp_path / "env-cache").absolute()
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "packrunner"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert default_cache_dir() == Path.home() / ".cache" / "packrunner"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "packrunner"


# Run by each of two processes: count this process's builds in a shared log, then print the path.
_BUILD_IN_A_PROCESS = """
import sys
import packrunner.models.cache as cache
real_build = cache.build_bert_onnx
def counting_build(*args, **kwargs):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    return real_build(*args, **kwargs)
cache.build_bert_onnx = counting_build
print(cache.default_model_path("packed", batch_size=2, seq_len=16, cache_dir=sys.argv[1]))
"""


def test_two_processes_building_the_same_model_build_it_once(tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    command = [sys.executable, "-c", _BUILD_IN_A_PROCESS, str(cache), str(log)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs[0] == outputs[1]
    assert log.read_text().splitlines() == ["built"]  # the other process waited, then reused
    onnx.checker.check_model(onnx.load(outputs[0]), full_check=True)
    assert [p.name for p in cache.iterdir()] == [Path(outputs[0]).name]


def test_concurrent_callers_get_one_complete_file(tmp_path: Path) -> None:
    def build(_: int) -> Path:
        return default_model_path("unpack_repack", batch_size=2, seq_len=16, cache_dir=tmp_path)

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = set(pool.map(build, range(8)))
    assert len(paths) == 1
    (path,) = paths
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # No temporary files left behind by the writers that lost the race.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_default_file_is_deterministic(tmp_path: Path) -> None:
    a = default_model_path("packed", batch_size=2, seq_len=16, cache_dir=tmp_path / "a")
    b = default_model_path("packed", batch_size=2, seq_len=16, cache_dir=tmp_path / "b")
    assert a.name == b.name
    assert a.read_bytes() == b.read_bytes()
