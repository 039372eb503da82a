"""``packrunner convert``: rewrite a Hugging Face encoder ONNX export into an input form.

See :mod:`packrunner.convert._converter` for what is rewritten; the data-flow matchers are in
``_match``, ``_match_cores``, ``_match_positions`` and ``_match_relative``, the rewrites in
``_rewrite``, ``_unpack`` and ``_mask_forms``.
"""

from __future__ import annotations

from packrunner.convert._converter import (
    PACKED_INPUT_NAMES,
    convert_file,
    convert_to_packed,
    explain,
)
from packrunner.errors import ConversionError

__all__ = [
    "PACKED_INPUT_NAMES",
    "ConversionError",
    "convert_file",
    "convert_to_packed",
    "explain",
]
