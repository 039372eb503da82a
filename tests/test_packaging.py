"""The source distribution: the package, README and LICENSE, and no tests (they need the repo)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import packrunner

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_carries_the_package_and_no_tests(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (archive,) = tmp_path.glob("packrunner-*.tar.gz")
    assert archive.name == f"packrunner-{packrunner.__version__}.tar.gz"  # one version source
    with tarfile.open(archive) as sdist:
        names = {name.partition("/")[2] for name in sdist.getnames()}
        info = sdist.extractfile(f"packrunner-{packrunner.__version__}/PKG-INFO")
        assert info is not None
        metadata = info.read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml", "packrunner/py.typed"} <= names
    assert "packrunner/cli.py" in names
    assert not [name for name in names if name.startswith("tests")]
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.11\n" in metadata
    requirements = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requirements  # the dependencies are declared...
    assert not [r for r in requirements if "torch" in r or "minilm" in r]  # ...no test-only pin
    assert "Apache License" in (ROOT / "LICENSE").read_text()
