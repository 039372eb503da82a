"""ONNX graph toolkit shared by the model builder and the converter.

:class:`GraphView` answers data-flow questions about a graph (producers, consumers, which inputs
a value depends on, constant values) and hands out fresh names; :class:`NodeEmitter` writes nodes
into it. The attention biases of each :class:`~packrunner.InputForm` are written here once:
:func:`block_diagonal_bias` (packed: segment ids -> ``[B, 1, S, S]``), :func:`padding_bias`
(padded: 0/1 mask -> ``[B, 1, 1, S]``) and :meth:`StreamIndex.attention_bias` (unpack/repack:
per slot), all with the one constant :data:`MASK_BIAS`; :class:`StreamIndex` also unpacks the
token stream into sample slots and repacks it. :func:`evaluate` runs the part of a graph a few
tensors need (the converter checks its matches by computing them).
"""

from __future__ import annotations

from packrunner.graphs._evaluate import evaluate, make_session
from packrunner.graphs._graph import GraphView, NodeEmitter, default_opset, subgraph_references
from packrunner.graphs._masks import (
    BLOCK_DIAGONAL_MARK,
    MASK_BIAS,
    block_diagonal_bias,
    padding_bias,
)
from packrunner.graphs._stream import UNPACK_INFO, StreamIndex

__all__ = [
    "BLOCK_DIAGONAL_MARK",
    "MASK_BIAS",
    "UNPACK_INFO",
    "GraphView",
    "NodeEmitter",
    "StreamIndex",
    "block_diagonal_bias",
    "default_opset",
    "evaluate",
    "make_session",
    "padding_bias",
    "subgraph_references",
]
