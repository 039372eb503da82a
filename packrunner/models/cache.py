"""On-disk cache of the default (random-weight) BERT models used by tests and benchmarks.

Building a model takes a fraction of a second but producing its ~16 MB file repeatedly in every
test process and benchmark adds up, and the runner wants a *path* (ONNX runtimes load files). The
file name carries a hash of every build parameter plus :data:`BUILDER_VERSION`, so a changed
builder or parameter can never be served a stale file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import onnx

from packrunner.config import InputForm
from packrunner.models.bert import DEFAULT_CONFIG, random_bert_weights
from packrunner.models.builder import MIN_OPSET, Head, build_bert_onnx

__all__ = [
    "BUILDER_VERSION",
    "CACHE_ENV_VAR",
    "DEFAULT_SEED",
    "checkpoint_model_path",
    "default_cache_dir",
    "default_model_path",
]

BUILDER_VERSION: Final = 3
"""Bump whenever the graph builder or :func:`random_bert_weights` changes what it produces."""

CACHE_ENV_VAR: Final = "PACKRUNNER_CACHE"
DEFAULT_SEED: Final = 0


def default_cache_dir() -> Path:
    """``$PACKRUNNER_CACHE`` if set (and non-empty), else ``$XDG_CACHE_HOME/packrunner`` (when
    that is an absolute path, as the XDG base directory spec requires), else
    ``~/.cache/packrunner``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "packrunner"
    return Path.home() / ".cache" / "packrunner"


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache directory so that one process builds, others wait.

    The lock is on the directory itself, so it leaves no file behind. Without ``fcntl``
    (Windows) every process may build; the atomic write keeps that safe.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers only ever see no file or the whole file.

    The temporary file lives in the destination directory because ``os.replace`` is atomic only
    within one filesystem; concurrent writers each use their own temporary name and the last
    rename wins with identical content.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def default_model_path(
    form: InputForm | str = InputForm.PACKED,
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    max_valid_num: int = 40,
    head: Head = "qa",
    cache_dir: str | os.PathLike[str] | None = None,
    dynamic: bool = False,
) -> Path:
    """Path of the default random-weight model for these build parameters, built on first use.

    The model is :data:`~packrunner.models.bert.DEFAULT_CONFIG` with
    ``random_bert_weights(DEFAULT_CONFIG, seed=0)``, built by
    :func:`~packrunner.models.builder.build_bert_onnx` at opset 17. Safe to call from several
    processes at once: one builds while the others wait for its file, which appears atomically.

    Args:
        form: The model's :class:`~packrunner.InputForm` (or its value).
        batch_size: Rows of the static batch.
        seq_len: Tokens per row.
        max_valid_num: Samples per batch / segments per row (see ``build_bert_onnx``).
        head: ``"qa"`` or ``"encoder"``.
        cache_dir: Directory for the file; defaults to :func:`default_cache_dir`.
        dynamic: Build with symbolic ``batch`` / ``seq`` dims (any shape up to ``seq_len``
            wide; packed and padded forms), see ``build_bert_onnx``.

    Returns:
        Absolute path of the ``.onnx`` file.
    """
    form = InputForm.parse(form)
    params = {
        "builder_version": BUILDER_VERSION,
        "config": dataclasses.asdict(DEFAULT_CONFIG),
        "seed": DEFAULT_SEED,
        "form": form.value,
        "head": head,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "max_valid_num": max_valid_num,
        "opset": MIN_OPSET,
    }
    stem = f"bert-{form}-{head}-b{batch_size}-s{seq_len}-m{max_valid_num}"
    if dynamic:  # only then, so the fixed models keep their cached files
        params["dynamic"] = True
        stem += "-dynamic"

    def build() -> onnx.ModelProto:
        return build_bert_onnx(
            DEFAULT_CONFIG,
            random_bert_weights(DEFAULT_CONFIG, seed=DEFAULT_SEED),
            form=form,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
            head=head,
            opset=MIN_OPSET,
            dynamic=dynamic,
        )

    return _cached_model(stem, params, build, cache_dir)


def _cached_model(
    stem: str,
    params: dict[str, object],
    build: Callable[[], onnx.ModelProto],
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    """The cached file for ``params`` (hashed into its name), built and written on first use."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    path = (directory / f"{stem}-{digest}.onnx").absolute()
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if not path.is_file():  # another process may have built it while we waited
            _atomic_write(path, build().SerializeToString(deterministic=True))
    return path


def checkpoint_model_path(
    folder: str | os.PathLike[str],
    form: InputForm | str = InputForm.PACKED,
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    max_valid_num: int = 40,
    head: Head | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dynamic: bool = False,
) -> Path:
    """Path of a model built from a Hugging Face checkpoint folder, built on first use.

    The cache key covers the build parameters and the checkpoint files' size and modification
    time, so an updated checkpoint is rebuilt.

    Args:
        folder: Folder with ``config.json`` and ``model.safetensors``.
        form: The model's :class:`~packrunner.InputForm` (or its value).
        batch_size: Rows of the static batch.
        seq_len: Tokens per row.
        max_valid_num: Samples per batch / segments per row.
        head: ``"qa"`` or ``"encoder"``; default: ``"qa"`` when the checkpoint has a QA head.
        cache_dir: Directory for the file; defaults to :func:`default_cache_dir`.
        dynamic: Build with symbolic ``batch`` / ``seq`` dims (packed and padded forms), as
            :func:`default_model_path` does.
    """
    from packrunner.models.bert import has_qa_head, load_hf_checkpoint

    source = Path(folder).expanduser().resolve()
    stamps = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in source.iterdir()
        if p.suffix in (".json", ".safetensors")
    )
    form = InputForm.parse(form)
    params = {
        "builder_version": BUILDER_VERSION,
        "source": str(source),
        "files": stamps,
        "form": form.value,
        "head": head,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "max_valid_num": max_valid_num,
        "opset": MIN_OPSET,
    }

    def build() -> onnx.ModelProto:
        config, weights = load_hf_checkpoint(source)
        chosen: Head = head if head is not None else ("qa" if has_qa_head(weights) else "encoder")
        return build_bert_onnx(
            config,
            weights,
            form=form,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
            head=chosen,
            opset=MIN_OPSET,
            dynamic=dynamic,
        )

    stem = f"{source.name}-{form}-b{batch_size}-s{seq_len}-m{max_valid_num}"
    if dynamic:  # only then, so the fixed models keep their cached files
        params["dynamic"] = True
        stem += "-dynamic"
    return _cached_model(stem, params, build, cache_dir)
