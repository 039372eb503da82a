"""Evaluate a few tensors of a graph on given feeds: the part of the graph they need, run alone.

The converter checks what its finders matched by computing it (e.g. that a position lookup's
indices are ``0, 1, 2 ...`` for an input of length ``n``), rather than trusting the pattern.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper

from packrunner.graphs._graph import GraphView, subgraph_references

__all__ = ["evaluate", "make_session"]


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A small CPU session (2 threads, no graph-level fusion surprises in checks)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def evaluate(
    model: onnx.ModelProto,
    view: GraphView,
    outputs: Sequence[str],
    feeds: Mapping[str, npt.NDArray[np.generic]],
) -> list[npt.NDArray[np.generic]]:
    """The values of ``outputs`` (tensors of ``view.graph``, the graph of ``model``) on ``feeds``.

    Only the nodes the outputs are computed from (values and shapes) are run. ``feeds`` must
    hold every graph input those nodes read.

    Raises:
        KeyError: A needed graph input has no feed.
        onnxruntime's errors: The part of the graph does not run on these feeds.
    """
    needed: dict[int, onnx.NodeProto] = {}
    tensors: set[str] = set()
    frontier = list(outputs)
    while frontier:
        name = frontier.pop()
        if name in tensors:
            continue
        tensors.add(name)
        node = view.producer(name)
        if node is None or id(node) in needed:
            continue
        needed[id(node)] = node
        frontier.extend(i for i in [*node.input, *subgraph_references(node)] if i)
    graph = view.graph
    inputs = [i for i in graph.input if i.name in tensors and view.is_graph_input(i.name)]
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise KeyError(f"no feed for graph inputs {missing}")
    part = helper.make_graph(
        [n for n in graph.node if id(n) in needed],
        "packrunner_evaluate",
        inputs,
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        initializer=[t for t in graph.initializer if t.name in tensors],
    )
    probe = helper.make_model(part, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    session = make_session(probe)
    return list(session.run(list(outputs), {i.name: feeds[i.name] for i in inputs}))
