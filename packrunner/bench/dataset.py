"""PopRT's synthetic dataset: the reference length distribution every benchmark runs on."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["PoprtSample", "poprt_dataset", "poprt_lengths", "short_text_dataset"]

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
