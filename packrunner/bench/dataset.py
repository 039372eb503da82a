"""Synthetic datasets: PopRT's reference length distribution, and others to run it against.

``seed`` (PopRT's, the default of every benchmark), ``short`` (short texts) and ``bimodal``
(tiny and near-full samples mixed: the case that separates packing rules).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "DISTRIBUTIONS",
    "PoprtSample",
    "poprt_dataset",
    "poprt_lengths",
    "short_text_dataset",
    "synthetic_dataset",
    "synthetic_lengths",
]

PoprtSample = dict[str, npt.NDArray[np.int32]]


def poprt_dataset(
    n: int,
    *,
    avg_seq_len: int = 128,
    max_seq_len: int = 256,
    emb_size: int = 30522,
    seed: int = 2023,
) -> list[PoprtSample]:
    """PopRT's ``get_synthetic_data``: same generator, same calls, same order, same values.

    Lengths are ``clip(int32(normal(avg, avg)), 1, max)``; each sample then draws its
    ``input_ids`` in ``[0, emb_size)`` and its ``token_type_ids`` in ``{0, 1}``.
    """
    # PopRT's example seeds numpy's legacy global generator; RandomState replays the same stream
    # without touching global state.
    legacy = np.random.RandomState(seed)
    lengths = _draw_lengths(legacy, n, avg_seq_len, max_seq_len)
    samples: list[PoprtSample] = []
    for length in lengths:
        input_ids = legacy.randint(0, emb_size, (length,)).astype(np.int32)
        token_type_ids = legacy.randint(0, 2, (length,)).astype(np.int32)
        samples.append({"input_ids": input_ids, "token_type_ids": token_type_ids})
    return samples


def poprt_lengths(
    n: int, *, avg_seq_len: int = 128, max_seq_len: int = 256, seed: int = 2023
) -> list[int]:
    """The lengths of :func:`poprt_dataset`'s samples, without drawing their ids."""
    lengths = _draw_lengths(np.random.RandomState(seed), n, avg_seq_len, max_seq_len)
    return [int(length) for length in lengths]


def _draw_lengths(
    legacy: np.random.RandomState, n: int, avg_seq_len: int, max_seq_len: int
) -> npt.NDArray[np.int32]:
    drawn = legacy.normal(avg_seq_len, avg_seq_len, size=n).astype(np.int32)
    return np.clip(drawn, 1, max_seq_len)


#: The length distributions a benchmark can draw, by name (``--distribution``).
DISTRIBUTIONS: dict[str, str] = {
    "seed": "PopRT's: clip(int(normal(avg, avg)), 1, max), mean 127.8 at [16, 256]",
    "short": "short texts: geometric lengths with mean 20, capped at the longest",
    "bimodal": "half 1-11 tokens, half 200-256 (scaled to the longest), shuffled",
}
SHORT_TEXT_MEAN = 20


def synthetic_lengths(
    distribution: str,
    n: int,
    *,
    avg_seq_len: int = 128,
    max_seq_len: int = 256,
    seed: int = 2023,
) -> list[int]:
    """``n`` sample lengths drawn from one of :data:`DISTRIBUTIONS`, each in ``[1, max_seq_len]``.

    ``seed`` is PopRT's generator (:func:`poprt_lengths`; ``avg_seq_len`` is its mean); the others
    draw from ``numpy.random.default_rng(seed)``.

    Raises:
        ValueError: An unknown distribution.
    """
    if distribution == "seed":
        return poprt_lengths(n, avg_seq_len=avg_seq_len, max_seq_len=max_seq_len, seed=seed)
    rng = np.random.default_rng(seed)
    if distribution == "short":
        drawn = np.minimum(rng.geometric(1 / SHORT_TEXT_MEAN, n), max_seq_len)
    elif distribution == "bimodal":
        short = rng.integers(1, max(1, max_seq_len * 11 // 256) + 1, n // 2)
        long = rng.integers(max(1, max_seq_len * 200 // 256), max_seq_len + 1, n - n // 2)
        drawn = np.concatenate([short, long])
        rng.shuffle(drawn)
    else:
        raise ValueError(
            f"unknown distribution {distribution!r}; choose from {list(DISTRIBUTIONS)}"
        )
    return [int(length) for length in drawn]


def synthetic_dataset(
    distribution: str,
    n: int,
    *,
    avg_seq_len: int = 128,
    max_seq_len: int = 256,
    emb_size: int = 30522,
    seed: int = 2023,
) -> list[PoprtSample]:
    """Samples whose lengths follow ``distribution`` (see :func:`synthetic_lengths`).

    ``seed`` is exactly :func:`poprt_dataset` and ``short`` :func:`short_text_dataset` (same
    lengths as :func:`synthetic_lengths`); ``bimodal`` draws ``input_ids`` in ``[0, emb_size)``
    and ``token_type_ids`` in ``{0, 1}`` per sample, like PopRT's generator.
    """
    if distribution == "seed":
        return poprt_dataset(
            n, avg_seq_len=avg_seq_len, max_seq_len=max_seq_len, emb_size=emb_size, seed=seed
        )
    if distribution == "short":
        return short_text_dataset(
            n, mean_len=SHORT_TEXT_MEAN, max_seq_len=max_seq_len, emb_size=emb_size, seed=seed
        )
    lengths = synthetic_lengths(distribution, n, max_seq_len=max_seq_len, seed=seed)
    rng = np.random.default_rng(seed + 1)  # ids independent of the lengths' stream
    return [
        {
            "input_ids": rng.integers(0, emb_size, length).astype(np.int32),
            "token_type_ids": rng.integers(0, 2, length).astype(np.int32),
        }
        for length in lengths
    ]


def short_text_dataset(
    n: int, *, mean_len: int = 20, max_seq_len: int = 256, emb_size: int = 30522, seed: int = 2023
) -> list[PoprtSample]:
    """Short texts (queries, titles, chat turns): lengths geometric with mean ``mean_len``,
    capped at ``max_seq_len``; ids and token types drawn as in :func:`poprt_dataset`."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1.0 / mean_len, size=n), max_seq_len)
    return [
        {
            "input_ids": rng.integers(0, emb_size, int(length), dtype=np.int32),
            "token_type_ids": rng.integers(0, 2, int(length), dtype=np.int32),
        }
        for length in lengths
    ]
