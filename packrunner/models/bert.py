"""BERT-style encoder configuration and weights, independent of any deep-learning framework.

Weights are plain ``float32`` numpy arrays keyed by the parameter names of Hugging Face's
``BertModel`` (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight`` ...), optionally with the ``qa_outputs.*`` head of
``BertForQuestionAnswering``. Keeping the Hugging Face names (rather than inventing our own) means
a ``model.safetensors`` checkpoint loads with no renaming table, and the ONNX graphs built from the
weights keep those names for their initializers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from packrunner.errors import ModelFormatError

__all__ = [
    "DEFAULT_CONFIG",
    "BertConfig",
    "BertWeights",
    "FloatArray",
    "ModelFormatError",
    "expected_parameter_shapes",
    "has_qa_head",
    "load_hf_checkpoint",
    "normalize_weights",
    "random_bert_weights",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
"""A ``float32`` numpy array."""

BertWeights: TypeAlias = dict[str, FloatArray]
"""BERT parameters by Hugging Face ``BertModel`` name (no ``bert.`` prefix once normalized)."""

QA_WEIGHT: Final = "qa_outputs.weight"
QA_BIAS: Final = "qa_outputs.bias"

# Hugging Face prefixes the encoder with "bert." inside task models (BertForQuestionAnswering,
# BertForMaskedLM ...), but not in a bare BertModel checkpoint; both spell the same parameters.
_HF_PREFIX: Final = "bert."
# The RoBERTa family's task models prefix it with "roberta." (XLM-R and CamemBERT too).
_HF_PREFIXES: Final = (_HF_PREFIX, "roberta.")
# config.json model types built by this module: BERT and the RoBERTa family (same layers).
_MODEL_TYPES: Final = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})

# Checkpoint files we read; listed once so error messages and the loader cannot disagree.
_CONFIG_FILE: Final = "config.json"
_WEIGHTS_FILE: Final = "model.safetensors"
_WEIGHTS_INDEX_FILE: Final = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class BertConfig:
    """Hyper-parameters of a BERT-style encoder (post-LayerNorm, absolute positions).

    Attributes:
        vocab_size: Rows of the word-embedding table.
        hidden_size: Model width ``H``; must be divisible by ``num_heads``.
        num_layers: Number of transformer layers.
        num_heads: Attention heads per layer.
        intermediate_size: Width of the feed-forward block.
        max_position_embeddings: Rows of the position-embedding table (longest sequence).
        type_vocab_size: Rows of the token-type (segment) embedding table.
        layer_norm_eps: Epsilon of every LayerNorm.
        hidden_act: Feed-forward activation; only ``"gelu"`` (the exact erf form, as Hugging
            Face's ``"gelu"``) is supported.
        position_offset: Position-table row of a sample's first token: 0 for BERT,
            ``padding_idx + 1`` for the RoBERTa family (RoBERTa, XLM-RoBERTa, CamemBERT), whose
            positions are ``cumsum(input_ids != pad) + padding_idx``. A sample is at most
            ``max_position_embeddings - position_offset`` tokens long.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_offset: int = 0

    def __post_init__(self) -> None:
        """Reject configs the graph builder cannot represent faithfully.

        Raises:
            ModelFormatError: If a size is not a positive int, the width does not split evenly
                into heads, or the activation is not exact gelu.
        """
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, field)
            # bool is an int subclass; True as a layer count is surely a bug.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"BertConfig.{field} must be a positive int, got {value!r}")
        offset = self.position_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ModelFormatError(
                f"BertConfig.position_offset must be an int >= 0, got {offset!r}"
            )
        if offset >= self.max_position_embeddings:
            raise ModelFormatError(
                f"position_offset {offset} leaves no row of the {self.max_position_embeddings} "
                "position embeddings"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ModelFormatError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ModelFormatError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden_act != "gelu":
            # "gelu_new"/"gelu_fast" are tanh approximations and "relu" a different function:
            # building them as exact gelu would silently give wrong outputs.
            raise ModelFormatError(
                f"unsupported hidden_act {self.hidden_act!r}; only exact 'gelu' is supported"
            )

    @property
    def max_length(self) -> int:
        """The longest sample the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``hidden_size // num_heads``)."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf_config: Mapping[str, Any]) -> BertConfig:
        """Build a config from a Hugging Face ``config.json`` mapping.

        Args:
            hf_config: The parsed ``config.json`` of a ``bert`` model, or of the RoBERTa family
                (``roberta``, ``xlm-roberta``, ``camembert``: BERT's layers, positions from
                ``pad_token_id + 1``).

        Returns:
            The equivalent :class:`BertConfig`.

        Raises:
            ModelFormatError: If ``model_type`` is not one of those, a required key is missing, or
                the model uses features the builder does not implement (relative positions, a
                non-gelu activation).
        """
        model_type = hf_config.get("model_type")
        if model_type not in _MODEL_TYPES:
            # DistilBERT, MPNet, ... share most names but differ in details (no token types,
            # relative attention bias) that would make the built graph silently wrong.
            raise ModelFormatError(
                f"expected model_type in {sorted(_MODEL_TYPES)}, got {model_type!r}"
            )
        offset = 0 if model_type == "bert" else int(hf_config.get("pad_token_id", 1)) + 1
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ModelFormatError(
                f"unsupported position_embedding_type {position_type!r}; only 'absolute'"
            )
        required = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
        }
        missing = [hf_key for hf_key in required.values() if hf_key not in hf_config]
        if missing:
            raise ModelFormatError(f"config.json lacks required keys: {', '.join(missing)}")
        try:
            return cls(
                **{ours: hf_config[theirs] for ours, theirs in required.items()},
                max_position_embeddings=hf_config.get("max_position_embeddings", 512),
                type_vocab_size=hf_config.get("type_vocab_size", 2),
                layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
                hidden_act=hf_config.get("hidden_act", "gelu"),
                position_offset=offset,
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelFormatError):
                raise
            raise ModelFormatError(f"invalid BERT config: {exc}") from exc


DEFAULT_CONFIG: Final = BertConfig(
    vocab_size=30522,
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
    type_vocab_size=2,
)
"""A small BERT (BERT-tiny sized) used for the default test/benchmark model."""


def expected_parameter_shapes(
    config: BertConfig, *, with_qa_head: bool = False
) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter a BERT of ``config`` needs, by Hugging Face name.

    Args:
        config: The model hyper-parameters.
        with_qa_head: Also list the ``qa_outputs`` question-answering head.

    Returns:
        Parameter name (without ``bert.`` prefix) to shape, in Hugging Face's order.
    """
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"] = (h, h)
            shapes[f"{p}attention.self.{proj}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        # Linear layers store [out_features, in_features], as torch.nn.Linear does.
        shapes[f"{p}intermediate.dense.weight"] = (i, h)
        shapes[f"{p}intermediate.dense.bias"] = (i,)
        shapes[f"{p}output.dense.weight"] = (h, i)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    if with_qa_head:
        shapes[QA_WEIGHT] = (2, h)
        shapes[QA_BIAS] = (2,)
    return shapes


def has_qa_head(weights: Mapping[str, npt.NDArray[Any]]) -> bool:
    """Whether ``weights`` carry a ``qa_outputs`` head (with or without ``bert.`` prefix)."""
    return any(
        name in weights
        for name in (QA_WEIGHT, QA_BIAS, _HF_PREFIX + QA_WEIGHT, _HF_PREFIX + QA_BIAS)
    )


def normalize_weights(
    config: BertConfig, weights: Mapping[str, npt.NDArray[Any]], *, copy: bool = True
) -> BertWeights:
    """Validate raw weights and return them as contiguous ``float32`` arrays without prefix.

    Names may carry a ``bert.`` prefix (task checkpoints) or not (bare ``BertModel``). Entries that
    are not BERT encoder/QA parameters (the ``embeddings.position_ids`` buffer, a pooler, an MLM
    head ...) are dropped, since no graph here uses them.

    Args:
        config: The hyper-parameters the weights must match.
        weights: Parameter name to array.
        copy: Always copy (the default), so the result cannot alias the caller's arrays, which
            may be memory-mapped or mutated later. ``False`` reuses contiguous ``float32`` arrays
            as they are, for read-only callers that run often (the numpy reference).

    Returns:
        A new dict with exactly the encoder parameters (plus ``qa_outputs.*`` if present).

    Raises:
        ModelFormatError: If a parameter is missing, duplicated under both spellings, has the
            wrong shape, is not floating point, or only half of the QA head is present.
    """
    stripped: dict[str, npt.NDArray[Any]] = {}
    for name, array in weights.items():
        key = next((name.removeprefix(p) for p in _HF_PREFIXES if name.startswith(p)), name)
        if key in stripped:
            raise ModelFormatError(f"parameter {key!r} given both with and without a prefix")
        stripped[key] = array

    qa_present = [name for name in (QA_WEIGHT, QA_BIAS) if name in stripped]
    if len(qa_present) == 1:
        raise ModelFormatError(f"incomplete QA head: only {qa_present[0]!r} present")
    shapes = expected_parameter_shapes(config, with_qa_head=bool(qa_present))

    missing = [name for name in shapes if name not in stripped]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} missing)" if len(missing) > 8 else ""
        )
        raise ModelFormatError(f"missing BERT parameters: {shown}")

    out: BertWeights = {}
    for name, shape in shapes.items():
        array = np.asarray(stripped[name])
        if array.shape != shape:
            raise ModelFormatError(
                f"parameter {name!r} has shape {array.shape}, expected {shape} for this config"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ModelFormatError(f"parameter {name!r} has non-float dtype {array.dtype}")
        out[name] = np.array(array, dtype=np.float32, order="C", copy=True if copy else None)
    return out


def random_bert_weights(config: BertConfig, seed: int, with_qa_head: bool = True) -> BertWeights:
    """Deterministic random weights, close to Hugging Face's initialization.

    Dense and embedding matrices are ``N(0, 0.02)`` as in ``BertPreTrainedModel._init_weights``.
    Unlike that init, biases are small but nonzero and LayerNorm scales/shifts are perturbed away
    from 1/0, and the QA head is wider (``N(0, 0.2)``): otherwise those parameters would be
    no-ops and a graph that mis-wires them would still match the reference.

    Args:
        config: Hyper-parameters of the model.
        seed: Seed of the numpy generator; equal seeds give bit-identical weights.
        with_qa_head: Also create ``qa_outputs.weight``/``qa_outputs.bias``.

    Returns:
        Normalized weights (see :func:`normalize_weights`).
    """
    rng = np.random.default_rng(seed)
    out: BertWeights = {}
    for name, shape in expected_parameter_shapes(config, with_qa_head=with_qa_head).items():
        if name.startswith("qa_outputs."):
            std = 0.2 if name == QA_WEIGHT else 0.1
            value = rng.normal(0.0, std, size=shape)
        elif "LayerNorm.weight" in name:
            value = 1.0 + rng.normal(0.0, 0.1, size=shape)
        elif "LayerNorm.bias" in name:
            value = rng.normal(0.0, 0.1, size=shape)
        else:
            # Dense/embedding matrices and dense biases alike.
            value = rng.normal(0.0, 0.02, size=shape)
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Load one ``.safetensors`` file into numpy arrays (no torch needed)."""
    # Imported lazily: only checkpoint loading needs safetensors, graph building does not.
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc


def load_hf_checkpoint(folder: str | os.PathLike[str]) -> tuple[BertConfig, BertWeights]:
    """Read a Hugging Face BERT checkpoint folder (``config.json`` + ``model.safetensors``).

    A sharded checkpoint (``model.safetensors.index.json`` plus shards) is read too. Both a bare
    ``BertModel`` and a ``BertForQuestionAnswering`` checkpoint load; the QA head is kept if
    present.

    Args:
        folder: Directory holding the checkpoint files.

    Returns:
        The config and the normalized ``float32`` weights.

    Raises:
        ModelFormatError: If the folder or a file is missing, ``model_type`` is not ``bert``, or
            a parameter is missing or misshapen.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ModelFormatError(f"checkpoint folder {root} does not exist")
    config_path = root / _CONFIG_FILE
    weights_path = root / _WEIGHTS_FILE
    index_path = root / _WEIGHTS_INDEX_FILE
    missing = []
    if not config_path.is_file():
        missing.append(_CONFIG_FILE)
    if not weights_path.is_file() and not index_path.is_file():
        missing.append(_WEIGHTS_FILE)
    if missing:
        raise ModelFormatError(f"checkpoint folder {root} lacks {', '.join(missing)}")

    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot parse {config_path}: {exc}") from exc
    if not isinstance(hf_config, dict):
        raise ModelFormatError(f"{config_path} is not a JSON object")
    config = BertConfig.from_hf_dict(hf_config)

    raw: dict[str, npt.NDArray[Any]] = {}
    if weights_path.is_file():
        raw = _read_safetensors(weights_path)
    else:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"cannot parse {index_path}: {exc}") from exc
        for shard in shards:
            shard_path = root / str(shard)
            if not shard_path.is_file():
                raise ModelFormatError(f"checkpoint folder {root} lacks shard {shard}")
            raw.update(_read_safetensors(shard_path))
    return config, normalize_weights(config, raw)
