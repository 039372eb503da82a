"""BERT-style encoder models as pure ``onnx.helper`` + numpy ONNX graphs (no torch).

Typical use::

    from packrunner import InputForm
    from packrunner.models import build_bert_onnx, load_hf_checkpoint

    config, weights = load_hf_checkpoint("path/to/bert")  # config.json + model.safetensors
    model = build_bert_onnx(config, weights, form=InputForm.PACKED, head="encoder")

or, for tests and benchmarks, :func:`default_model_path` for a cached random-weight model.
"""

from __future__ import annotations

from packrunner.models.bert import (
    DEFAULT_CONFIG,
    BertConfig,
    BertWeights,
    FloatArray,
    ModelFormatError,
    expected_parameter_shapes,
    has_qa_head,
    load_hf_checkpoint,
    normalize_weights,
    random_bert_weights,
)
from packrunner.models.builder import (
    HEADS,
    MIN_OPSET,
    Head,
    build_bert_onnx,
    input_names,
    output_names,
)
from packrunner.models.cache import (
    BUILDER_VERSION,
    CACHE_ENV_VAR,
    checkpoint_model_path,
    default_cache_dir,
    default_model_path,
)
from packrunner.models.checkpoints import MINILM_DISTRIBUTION, minilm_checkpoint_dir
from packrunner.models.reference import reference_forward

__all__ = [
    "BUILDER_VERSION",
    "CACHE_ENV_VAR",
    "DEFAULT_CONFIG",
    "HEADS",
    "MINILM_DISTRIBUTION",
    "MIN_OPSET",
    "BertConfig",
    "BertWeights",
    "FloatArray",
    "Head",
    "ModelFormatError",
    "build_bert_onnx",
    "checkpoint_model_path",
    "default_cache_dir",
    "default_model_path",
    "expected_parameter_shapes",
    "has_qa_head",
    "input_names",
    "load_hf_checkpoint",
    "minilm_checkpoint_dir",
    "normalize_weights",
    "output_names",
    "random_bert_weights",
    "reference_forward",
]
