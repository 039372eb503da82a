"""packrunner.compat.mean_absolute_error: scikit-learn's results without scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from packrunner.compat import mean_absolute_error


def test_one_output() -> None:
    # scikit-learn's documented example values.
    assert mean_absolute_error([3, -0.5, 2, 7], [2.5, 0.0, 2, 8]) == pytest.approx(0.5)
    assert isinstance(mean_absolute_error([1.0], [1.0]), float)
    # float16 predictions and list targets, as Graphcore's example compares them.
    predicted = np.array([0.1, 0.2], dtype=np.float16)
    assert mean_absolute_error([0.1, 0.2], predicted) == pytest.approx(
        float(np.mean(np.abs(predicted.astype(np.float64) - [0.1, 0.2])))
    )


def test_several_outputs() -> None:
    y_true: list[list[float]] = [[0.5, 1], [-1, 1], [7, -6]]
    y_pred: list[list[float]] = [[0, 2], [-1, 2], [8, -5]]
    assert mean_absolute_error(y_true, y_pred) == pytest.approx(0.75)
    np.testing.assert_allclose(
        mean_absolute_error(y_true, y_pred, multioutput="raw_values"), [0.5, 1.0]
    )
    assert mean_absolute_error(y_true, y_pred, multioutput=[0.3, 0.7]) == pytest.approx(0.85)
    assert mean_absolute_error([1, 2], [2, 4], sample_weight=[3, 1]) == pytest.approx(1.25)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shapes"):
        mean_absolute_error([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        mean_absolute_error([], [])
    with pytest.raises(ValueError, match="sample_weight"):
        mean_absolute_error([1, 2], [1, 2], sample_weight=[1])
    with pytest.raises(ValueError, match="multioutput"):
        mean_absolute_error([1, 2], [1, 2], multioutput="variance_weighted")
