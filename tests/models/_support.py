"""Helpers shared by the model tests (kept out of conftest so test modules can import them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

TOLERANCE = 1e-5
"""Max abs difference allowed between a packed graph, the padded graph and the numpy reference."""

MAX_DIFFS: dict[str, float] = {}
"""Largest difference seen per comparison label; printed by conftest at the end of the run."""


def record_max_diff(label: str, value: float) -> None:
    """Remember the largest ``value`` seen under ``label`` for the end-of-run summary."""
    MAX_DIFFS[label] = max(value, MAX_DIFFS.get(label, 0.0))


def max_abs_diff(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Largest elementwise ``|a - b|``, computed in float64."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    assert a64.shape == b64.shape, (a64.shape, b64.shape)
    return float(np.max(np.abs(a64 - b64))) if a64.size else 0.0


class OrtModel:
    """An onnxruntime CPU session returning outputs by name."""

    def __init__(self, model: onnx.ModelProto | Path) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: keep pytest output readable
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_names: list[str] = [i.name for i in self._session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]

    def __call__(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        results = self._session.run(None, dict(feeds))
        return dict(zip(self.output_names, results, strict=True))
