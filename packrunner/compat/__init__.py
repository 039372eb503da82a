"""Drop-in replacements for the Graphcore PopRT APIs that PackRunner code uses.

PopRT is no longer developed. Code written against its PackRunner (Graphcore's
``packed_bert_example.py``) moves to packrunner by changing imports only:

============================================  ==================================================
PopRT                                         packrunner
============================================  ==================================================
``from poprt import runtime``                 ``from packrunner.compat import poprt_runtime as
                                              runtime``
``from poprt.backend import get_session``     ``from packrunner.compat.backend import
                                              get_session``
``import packing_utils``                      ``from packrunner.compat import packing_utils``
``from sklearn.metrics import                 ``from packrunner.compat import
mean_absolute_error``                         mean_absolute_error``
============================================  ==================================================

The submodules are imported on first use (``poprt_runtime`` and ``backend`` load onnx and
onnxruntime). ``docs/migration.md`` lists every name and what behaves differently.
"""

from __future__ import annotations

from packrunner.compat.metrics import mean_absolute_error

__all__ = ["mean_absolute_error"]
