"""PopRT's ``poprt.backend.get_session``: run a fixed-shape ONNX model on whole batches.

Replace ``from poprt.backend import get_session`` with::

    from packrunner.compat.backend import get_session

    sess = get_session("model.onnx", 1, "poprt").load()
    start, end = sess.run(["start_logits", "end_logits"], feeds)   # list, in the order asked

The session runs the model with onnxruntime at its compiled shape. Feeds are adapted the way
PopRT users' code needs: integer feeds are cast to the model's dtypes, feeds the model does not
take are dropped (e.g. ``position_ids`` given to a padded model, which computes positions
itself, or ``attention_mask`` given to an unpack/repack model), and a ``[max_valid_num, 1]``
``unpack_info`` from ``packing_utils.pack_data`` is reshaped to the model's ``[max_valid_num]``.

With ``export_popef=True``, :meth:`Session.load` also writes ``output_dir/executable.popef``
for ``poprt_runtime.Runner``. packrunner has no PopEF format: the file is the ONNX model itself
(a hard link to it when possible, else a copy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt

from packrunner.errors import (
    ConfigError,
    DeviceError,
    InvalidSampleError,
    RunnerNotStartedError,
)

__all__ = ["POPEF_NAME", "Session", "get_session"]

logger = logging.getLogger(__name__)

POPEF_NAME: Final = "executable.popef"
"""File name of the export, as PopRT names it."""

_BACKENDS: Final = frozenset({"poprt", "onnxruntime"})

# onnxruntime's type strings for the tensor types a BERT-style model takes or returns.
_ORT_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
}

#: Name -> (shape, dtype); a symbolic dim is None.
IOInfo = dict[str, tuple[tuple[int | None, ...], np.dtype[Any]]]


class Session:
    """A loaded model that runs whole fixed-shape batches (PopRT's backend session).

    Create it with :func:`get_session`; call :meth:`load` before :meth:`run`. ``run`` is
    thread-safe (onnxruntime sessions are).

    Args:
        model: Path of an ONNX model, or its serialized bytes.
        num_ipus: Accepted for PopRT compatibility; must be >= 1 and is otherwise ignored.
        backend: ``"poprt"`` or ``"onnxruntime"``; both run on onnxruntime.
        output_dir: Directory for the export (default: the current directory).
        export_popef: Write ``output_dir/executable.popef`` in :meth:`load`.
        intra_op_num_threads: onnxruntime threads (packrunner extension; default: every core).

    Raises:
        ConfigError: An argument is out of range or the model file does not exist.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        num_ipus: int = 1,
        backend: str = "poprt",
        *,
        output_dir: str | os.PathLike[str] | None = None,
        export_popef: bool = False,
        intra_op_num_threads: int | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
        if not isinstance(num_ipus, int) or isinstance(num_ipus, bool) or num_ipus < 1:
            raise ConfigError(f"num_ipus must be an int >= 1, got {num_ipus!r}")
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise ConfigError(f"model {str(model)!r} is not a file")
        self._model = model if isinstance(model, bytes) else Path(model)
        self._output_dir = Path(output_dir) if output_dir is not None else Path.cwd()
        self._export_popef = export_popef
        self._intra_op_num_threads = intra_op_num_threads
        self._session: Any = None
        self._inputs: IOInfo = {}
        self._outputs: IOInfo = {}
        self._popef_path: Path | None = None
        self._lock = threading.Lock()

    @property
    def popef_path(self) -> Path | None:
        """Where :meth:`load` exported the model, or None without ``export_popef``."""
        return self._popef_path

    def load(self) -> Self:
        """Create the onnxruntime session, and export the model if asked.

        Returns:
            The session itself (PopRT's ``get_session(...).load()`` chaining).

        Raises:
            DeviceError: onnxruntime could not load the model.
            OSError: The export could not be written.
        """
        import onnxruntime as ort

        with self._lock:
            if self._session is not None:
                return self
            if self._export_popef:
                self._popef_path = _export(self._model, self._output_dir / POPEF_NAME)
            options = ort.SessionOptions()
            if self._intra_op_num_threads is not None:
                options.intra_op_num_threads = self._intra_op_num_threads
            source = self._model if isinstance(self._model, bytes) else str(self._model)
            try:
                session = ort.InferenceSession(
                    source, sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                raise DeviceError(f"onnxruntime could not load the model: {exc}") from exc
            self._inputs = {value.name: _io_info(value) for value in session.get_inputs()}
            self._outputs = {value.name: _io_info(value) for value in session.get_outputs()}
            self._session = session
        return self

    def get_io_info(self) -> tuple[IOInfo, IOInfo]:
        """``(inputs, outputs)``: name -> (shape, dtype) of the loaded model."""
        self._require_loaded()
        return dict(self._inputs), dict(self._outputs)

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, npt.ArrayLike]
    ) -> list[npt.NDArray[Any]]:
        """Run one batch.

        Args:
            output_names: Outputs to return, in this order (None: all, in model order).
            feeds: Input name -> array at the model's shape. Feeds the model does not take are
                dropped (logged at debug level); integer feeds are cast to the model's dtype; a
                shape that differs only by size-1 dims (``unpack_info`` ``[M, 1]`` for ``[M]``)
                is reshaped.

        Returns:
            The outputs, one array per name, in ``output_names`` order.

        Raises:
            RunnerNotStartedError: :meth:`load` was not called.
            InvalidSampleError: An unknown output, a missing input, or a feed whose shape does
                not fit the model.
            DeviceError: onnxruntime failed.
        """
        self._require_loaded()
        names = list(self._outputs) if output_names is None else list(output_names)
        unknown = [name for name in names if name not in self._outputs]
        if unknown:
            raise InvalidSampleError(
                f"unknown output(s) {unknown}; the model's outputs are {list(self._outputs)}"
            )
        dropped = sorted(name for name in feeds if name not in self._inputs)
        if dropped:
            logger.debug("dropping feeds the model does not take: %s", dropped)
        prepared = {
            name: _adapt(name, feeds[name], shape, dtype)
            for name, (shape, dtype) in self._inputs.items()
            if name in feeds
        }
        missing = [name for name in self._inputs if name not in prepared]
        if missing:
            raise InvalidSampleError(
                f"missing input(s) {missing}; the model takes {list(self._inputs)}",
                input_name=missing[0],
            )
        try:
            values: list[npt.NDArray[Any]] = self._session.run(names, prepared)
        except Exception as exc:
            raise DeviceError(f"onnxruntime failed: {exc}") from exc
        return values

    def close(self) -> None:
        """Drop the onnxruntime session."""
        with self._lock:
            self._session = None

    def __enter__(self) -> Self:
        return self.load()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _require_loaded(self) -> None:
        if self._session is None:
            raise RunnerNotStartedError("call load() first: get_session(...).load()")


def get_session(
    model: str | os.PathLike[str] | bytes,
    num_ipus: int = 1,
    backend: str = "poprt",
    *,
    output_dir: str | os.PathLike[str] | None = None,
    export_popef: bool = False,
    intra_op_num_threads: int | None = None,
) -> Session:
    """PopRT's ``get_session``: a :class:`Session` for ``model`` (call ``.load()`` on it).

    See :class:`Session` for the arguments.

    Example:
        >>> sess = get_session("model.onnx", 1, "poprt", output_dir="out",    # doctest: +SKIP
        ...                    export_popef=True).load()
        >>> sess.popef_path                                                    # doctest: +SKIP
        PosixPath('out/executable.popef')
    """
    return Session(
        model,
        num_ipus,
        backend,
        output_dir=output_dir,
        export_popef=export_popef,
        intra_op_num_threads=intra_op_num_threads,
    )


def _io_info(value: Any) -> tuple[tuple[int | None, ...], np.dtype[Any]]:
    shape = tuple(dim if isinstance(dim, int) and dim > 0 else None for dim in value.shape)
    dtype = _ORT_DTYPES.get(value.type)
    if dtype is None:
        raise ConfigError(f"model input/output {value.name!r} has unsupported type {value.type}")
    return shape, dtype


def _adapt(
    name: str, value: npt.ArrayLike, shape: tuple[int | None, ...], dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    array = np.asarray(value)
    if not _fits(array.shape, shape):
        squeezed = tuple(d for d in array.shape if d != 1)
        wanted = tuple(d for d in shape if d != 1)
        if None in shape or squeezed != wanted:
            raise InvalidSampleError(
                f"feed {name!r} has shape {array.shape}; the model takes {_show(shape)}",
                input_name=name,
            )
        array = array.reshape(tuple(d for d in shape if d is not None))
    if array.dtype != dtype:
        # Integers cast to the model's integer width (int32 <-> int64 is what PopRT users
        # need); a float fed to an integer input (or the reverse) is a bug, not a cast.
        if (array.dtype.kind in "iub") != (dtype.kind in "iub"):
            raise InvalidSampleError(
                f"feed {name!r} has dtype {array.dtype}; the model takes {dtype}", input_name=name
            )
        array = array.astype(dtype)
    return array


def _fits(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or e == a for a, e in zip(actual, expected, strict=True)
    )


def _show(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _export(model: Path | bytes, destination: Path) -> Path:
    """Write the model to ``destination`` atomically; a hard link when the filesystem allows.

    The link costs no space and no copy time for the multi-MB models; the temporary name plus
    ``os.replace`` means a Runner never sees a half-written file.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent
    )
    os.close(fd)
    try:
        if isinstance(model, bytes):
            Path(temporary).write_bytes(model)
        else:
            os.unlink(temporary)
            try:
                os.link(model, temporary)
            except OSError:  # another filesystem, or links not supported: copy instead
                shutil.copyfile(model, temporary)
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return destination
