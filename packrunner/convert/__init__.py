"""``packrunner convert``: rewrite a Hugging Face encoder ONNX export into the packed form.

See :mod:`packrunner.convert._converter` for what is rewritten and how the subgraphs are found.
"""

from __future__ import annotations

from packrunner.convert._converter import (
    PACKED_INPUT_NAMES,
    AttentionMode,
    convert_file,
    convert_to_packed,
)
from packrunner.errors import ConversionError
from packrunner.graphs import MASK_BIAS

__all__ = [
    "MASK_BIAS",
    "PACKED_INPUT_NAMES",
    "AttentionMode",
    "ConversionError",
    "convert_file",
    "convert_to_packed",
]
