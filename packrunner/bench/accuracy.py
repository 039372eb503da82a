"""Accuracy of packed results against a reference run: PopRT's ``calculate_mae`` and more."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["OutputAccuracy", "compare_results"]


@dataclass(frozen=True, slots=True)
class OutputAccuracy:
    """How far one output's results are from the expected ones, over valid tokens only.

    Attributes:
        name: Output name.
        mean_mae: Mean over samples of each sample's mean absolute error (PopRT's
            "average mae").
        max_abs_diff: Largest absolute difference over every valid element of every sample.
        worst_samples: ``(sample index, mae)`` of the samples with the largest MAE, worst first.
    """

    name: str
    mean_mae: float
    max_abs_diff: float
    worst_samples: tuple[tuple[int, float], ...]


def compare_results(
    expected: Sequence[Mapping[str, npt.ArrayLike]],
    actual: Sequence[Mapping[str, npt.ArrayLike]],
    lengths: Sequence[int] | None = None,
    *,
    top_k: int = 10,
) -> dict[str, OutputAccuracy]:
    """Compare per-sample outputs, like PopRT's ``calculate_mae`` over each sample's length.

    Args:
        expected: Reference results, one mapping per sample (e.g. the padded model's).
        actual: Results to check, same order.
        lengths: Valid length of each sample; outputs are compared over ``[:length]`` of their
            first dim (PopRT's caller-allocated buffers are ``max_seq_len`` long). Default:
            the full length of the shorter of the two.
        top_k: How many worst samples to report per output.

    Returns:
        Accuracy per output name present in both.

    Raises:
        ValueError: The sequences differ in length, or a sample's outputs differ in shape.
    """
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected results but {len(actual)} actual ones")
    if lengths is not None and len(lengths) != len(expected):
        raise ValueError(f"{len(lengths)} lengths for {len(expected)} results")
    if not expected:
        return {}
    names = [name for name in expected[0] if name in actual[0]]
    report: dict[str, OutputAccuracy] = {}
    for name in names:
        maes: list[float] = []
        worst = 0.0
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            want_array = np.asarray(want[name], dtype=np.float64)
            got_array = np.asarray(got[name], dtype=np.float64)
            length = lengths[index] if lengths is not None else min(len(want_array), len(got_array))
            a, b = want_array[:length], got_array[:length]
            if a.shape != b.shape:
                raise ValueError(
                    f"sample {index} output {name!r}: shapes {a.shape} and {b.shape} differ"
                )
            diff = np.abs(a - b)
            maes.append(float(diff.mean()) if diff.size else 0.0)
            worst = max(worst, float(diff.max(initial=0.0)))
        order = np.argsort(maes)[::-1][:top_k]
        report[name] = OutputAccuracy(
            name=name,
            mean_mae=float(np.mean(maes)),
            max_abs_diff=worst,
            worst_samples=tuple((int(i), maes[int(i)]) for i in order),
        )
    return report
