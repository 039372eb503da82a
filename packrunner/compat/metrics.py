"""A dependency-free ``mean_absolute_error`` compatible with scikit-learn's.

Graphcore's example checks packed against padded logits with
``sklearn.metrics.mean_absolute_error``; scikit-learn is a large dependency for one mean, so
packrunner ships the same function (same arguments, same results for 1-D and 2-D inputs).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["mean_absolute_error"]


def mean_absolute_error(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    *,
    sample_weight: npt.ArrayLike | None = None,
    multioutput: Literal["raw_values", "uniform_average"] | npt.ArrayLike = "uniform_average",
) -> float | npt.NDArray[np.float64]:
    """Mean absolute error, as ``sklearn.metrics.mean_absolute_error`` computes it.

    Values are compared in float64, so float16 predictions (PopRT's usual ``out_dict`` dtype)
    are not rounded a second time.

    Args:
        y_true: Targets, shape ``[n]`` or ``[n, outputs]``.
        y_pred: Predictions, same shape as ``y_true``.
        sample_weight: Optional weight per sample, shape ``[n]``.
        multioutput: ``"uniform_average"`` (mean over outputs), ``"raw_values"`` (one error per
            output) or a weight per output.

    Returns:
        The error: a float, or an array of one error per output with ``"raw_values"``.

    Raises:
        ValueError: Empty inputs, mismatched shapes or weights, or an unknown ``multioutput``.

    Example:
        >>> mean_absolute_error([3.0, -0.5, 2.0], [2.5, 0.0, 2.0])
        0.3333333333333333
    """
    true = _as_2d("y_true", y_true)
    pred = _as_2d("y_pred", y_pred)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred have different shapes: {true.shape} and {pred.shape}")
    weights = None
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != (true.shape[0],):
            raise ValueError(
                f"sample_weight has shape {weights.shape}, expected ({true.shape[0]},)"
            )
    errors = np.average(np.abs(pred - true), weights=weights, axis=0)
    if isinstance(multioutput, str):
        if multioutput == "raw_values":
            return errors
        if multioutput == "uniform_average":
            return float(np.mean(errors))
        raise ValueError(
            f"multioutput must be 'raw_values', 'uniform_average' or an array of weights, "
            f"got {multioutput!r}"
        )
    output_weights = np.asarray(multioutput, dtype=np.float64)
    if output_weights.shape != errors.shape:
        raise ValueError(
            f"multioutput weights have shape {output_weights.shape}, expected {errors.shape}"
        )
    return float(np.average(errors, weights=output_weights))


def _as_2d(name: str, values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    return array
