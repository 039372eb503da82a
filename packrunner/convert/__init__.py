"""``packrunner convert``: rewrite a Hugging Face encoder ONNX export into an input form.

See :mod:`packrunner.convert._converter` for what is rewritten; the data-flow matchers are in
``_match``, ``_match_cores`` and ``_match_positions``, the rewrites in ``_rewrite`` and ``_unpack``;
``_attention_ops`` handles attention computed by one op, ``_precision`` the fp16 conversion.
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
