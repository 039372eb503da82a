"""ONNX graph toolkit shared by the model builder and the converter.

:class:`GraphView` answers data-flow questions about an existing graph (producers, consumers,
which inputs a value depends on, constant values); :class:`NodeEmitter` appends nodes with
unique names. ``MASK_BIAS`` is the one additive bias every packed attention uses.
"""

from __future__ import annotations

from packrunner.graphs._graph import (
    MASK_BIAS,
    GraphView,
    NodeEmitter,
    default_opset,
    subgraph_references,
)

__all__ = ["MASK_BIAS", "GraphView", "NodeEmitter", "default_opset", "subgraph_references"]
