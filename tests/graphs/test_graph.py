"""GraphView naming and NodeEmitter bookkeeping (the parts builder and converter both lean on)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from packrunner.graphs import GraphView, NodeEmitter


def _graph() -> onnx.GraphProto:
    node = helper.make_node("Identity", ["x"], ["y"], name="copy")
    value = helper.make_tensor_value_info
    return helper.make_graph(
        [node], "g", [value("x", TensorProto.FLOAT, [2])], [value("y", TensorProto.FLOAT, [2])]
    )


def test_fresh_names_never_collide_even_before_nodes_join_the_graph() -> None:
    view = GraphView(_graph())
    names = [view.fresh_name("y") for _ in range(3)] + [view.fresh_name("copy")]
    assert names == ["y_1", "y_2", "y_3", "copy_1"]
    view.refresh()  # handed-out names stay taken after the indexes are rebuilt
    assert view.fresh_name("y") == "y_4"


def test_reserve_takes_exact_names_once() -> None:
    view = GraphView(_graph())
    assert view.reserve("z") == "z"
    for taken in ("z", "x", "y", "copy"):
        with pytest.raises(ValueError, match="already in use"):
            view.reserve(taken)
    # An output whose producer was renamed away is free for its new producer (once).
    view.rename_tensor("y", view.fresh_name("y_stream"))
    assert view.reserve("y") == "y"
    with pytest.raises(ValueError, match="already in use"):
        view.reserve("y")


@pytest.mark.parametrize("opset", [11, 17])
def test_emitter_shares_constants_and_follows_the_opset(opset: int) -> None:
    graph = _graph()
    emit = NodeEmitter(GraphView(graph), opset=opset, prefix="p")
    first = emit.const([1, 2], np.int64, "pair")
    assert emit.const([1, 2], np.int64, "other") == first == "p/pair"
    assert emit.const([1, 2], np.int32, "pair") == "p/pair_1"  # another dtype, another value
    assert emit.typed_const(0.5, TensorProto.FLOAT16) == emit.typed_const(0.5, TensorProto.FLOAT16)
    out = emit.with_axes("Unsqueeze", "y", [0])
    node = emit.nodes[-1]
    assert (len(node.input), [a.name for a in node.attribute]) == (
        (2, []) if opset >= 13 else (1, ["axes"])
    )
    graph.node.extend(emit.nodes)
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 2]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
