"""A plain-numpy BERT forward pass for one unpadded sample, the ground truth for the ONNX graphs.

It shares nothing with the graph builder but the weight names: no ONNX, no masks, no packing,
positions ``0..L-1`` and full attention, computed in float64 so the comparison measures the
graphs' fp32 error rather than two fp32 implementations' rounding against each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from packrunner.models.bert import QA_BIAS, QA_WEIGHT, BertConfig, normalize_weights

__all__ = ["erf", "reference_forward"]

F64: TypeAlias = npt.NDArray[np.float64]

# Vectorized math.erf: numpy has no erf and scipy is not a dependency. libm's erf is correctly
# rounded to ~1 ulp in float64, which is all a reference needs.
_ERF = np.frompyfunc(math.erf, 1, 1)


def erf(x: npt.ArrayLike) -> F64:
    """Elementwise error function in float64."""
    values = np.asarray(x, dtype=np.float64)
    return np.asarray(_ERF(values), dtype=np.float64).reshape(values.shape)


def _layer_norm(x: F64, gamma: F64, beta: F64, eps: float) -> F64:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    result: F64 = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return result


def _softmax(x: F64) -> F64:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    result: F64 = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def reference_forward(
    config: BertConfig,
    weights: Mapping[str, npt.NDArray[Any]],
    input_ids: npt.ArrayLike,
    token_type_ids: npt.ArrayLike | None = None,
) -> dict[str, F64]:
    """Run BERT on one sample exactly as Hugging Face's ``BertModel`` (eval mode) would.

    Args:
        config: Model hyper-parameters.
        weights: Parameters by Hugging Face name (``bert.`` prefix optional).
        input_ids: ``[L]`` token ids of one sample, no padding, ``1 <= L <= max_position``.
        token_type_ids: ``[L]`` segment ids; zeros if omitted.

    Returns:
        float64 arrays: ``last_hidden_state`` ``[L, H]``, ``sentence_embedding`` ``[H]`` (mean
        over the ``L`` tokens) and, if the weights have a QA head, ``start_logits`` and
        ``end_logits`` ``[L]``.

    Raises:
        ValueError: If the ids are not 1-D, empty, too long or out of vocabulary range.
    """
    w32 = normalize_weights(config, weights, copy=False)
    ids = np.asarray(input_ids)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    if ids.ndim != 1 or types.shape != ids.shape:
        raise ValueError(f"expected equal 1-D ids, got {ids.shape} and {types.shape}")
    length = ids.shape[0]
    if not 1 <= length <= config.max_length:
        raise ValueError(f"length {length} outside 1..{config.max_length}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError("input_ids out of vocabulary range")
    if types.min() < 0 or types.max() >= config.type_vocab_size:
        raise ValueError("token_type_ids out of range")

    w = {
        name: value.astype(np.float64) for name, value in w32.items() if "_embeddings." not in name
    }
    eps = config.layer_norm_eps
    nh, d, h = config.num_heads, config.head_dim, config.hidden_size

    def dense(x: F64, prefix: str) -> F64:
        result: F64 = x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]
        return result

    def norm(x: F64, prefix: str) -> F64:
        return _layer_norm(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)

    # Gather embedding rows before widening: converting the whole ~30k-row vocabulary table to
    # float64 on every call would dominate the run time.
    x = (
        w32["embeddings.word_embeddings.weight"][ids].astype(np.float64)
        + w32["embeddings.token_type_embeddings.weight"][types].astype(np.float64)
        + w32["embeddings.position_embeddings.weight"][
            config.position_offset : config.position_offset + length
        ].astype(np.float64)
    )
    x = norm(x, "embeddings.LayerNorm")
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            dense(x, f"{p}attention.self.{proj}").reshape(length, nh, d).transpose(1, 0, 2)
            for proj in ("query", "key", "value")
        )
        probs = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(d))  # [nh, L, L]
        context = (probs @ v).transpose(1, 0, 2).reshape(length, h)
        x = norm(dense(context, f"{p}attention.output.dense") + x, f"{p}attention.output.LayerNorm")
        inner = dense(x, f"{p}intermediate.dense")
        inner = inner * 0.5 * (1.0 + erf(inner / math.sqrt(2.0)))
        x = norm(dense(inner, f"{p}output.dense") + x, f"{p}output.LayerNorm")

    out: dict[str, F64] = {"last_hidden_state": x, "sentence_embedding": x.mean(axis=0)}
    if QA_WEIGHT in w:
        logits = x @ w[QA_WEIGHT].T + w[QA_BIAS]
        out["start_logits"] = np.ascontiguousarray(logits[:, 0])
        out["end_logits"] = np.ascontiguousarray(logits[:, 1])
    return out
