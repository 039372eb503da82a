"""``packrunner convert``: rewrite a Hugging Face encoder ONNX export into an input form.

See :mod:`packrunner.convert._converter` for what is rewritten; the data-flow matchers are in
``_match``, ``_match_cores``, ``_match_positions``, ``_match_relative`` and ``_match_pooling``,
the rewrites in ``_rewrite``, ``_unpack``, ``_mask_forms`` and ``_pooling``; ``_attention_ops``
handles attention computed by one op, ``_precision`` the fp16 conversion.
"""

from __future__ import annotations

from packrunner.convert._converter import (
    PACKED_INPUT_NAMES,
    convert_file,
    convert_to_packed,
    explain,
)
from packrunner.convert._precision import Precision
from packrunner.errors import ConversionError

__all__ = [
    "PACKED_INPUT_NAMES",
    "ConversionError",
    "Precision",
    "convert_file",
    "convert_to_packed",
    "explain",
]
