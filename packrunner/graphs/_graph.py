"""Data-flow view of an ONNX graph, and the one node emitter that writes into it.

Nothing here knows about BERT. :class:`GraphView` answers "who produces / consumes this tensor",
"is this tensor a constant and what is its value", "which graph inputs does this tensor's *value*
depend on", and does the bookkeeping of an edit (fresh names, topological re-sort, dead-node
pruning). The converter matches patterns on these answers rather than on node names, because
exporters rename nodes freely (``Shape_7`` in one export is ``/bert/embeddings/Shape`` or
``node_Shape_3`` in the next). :class:`NodeEmitter` appends nodes and initializers with fresh
names; the model builder writes whole graphs with it, the converter its rewrites.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

__all__ = ["GraphView", "NodeEmitter", "default_opset", "subgraph_references"]

# Ops whose output does not depend on the *values* of their input, only on its shape. A mask built
# from ``Shape(hidden_states)`` therefore still counts as depending on the attention mask alone.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset version for the default (``ai.onnx``) domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the model imports no ai.onnx opset")


def subgraph_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(subgraph_references(inner) - local)
            names.update(o.name for o in graph.output if o.name not in local)
    return names


class GraphView:
    """Indexes of one graph's data flow; call :meth:`refresh` after editing the graph.

    Attributes:
        graph: The graph being viewed (and edited in place by the caller).
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        """Build the indexes for ``graph``."""
        self.graph = graph
        self._producer: dict[str, onnx.NodeProto] = {}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        self._initializers: dict[str, onnx.TensorProto] = {}
        self._input_names: set[str] = set()
        self._deps: dict[str, frozenset[str]] = {}
        self._const_cache: dict[str, npt.NDArray[np.generic] | None] = {}
        self._names: set[str] | None = None
        # Names handed out by fresh_name/reserve: they stay taken across refreshes, so nodes
        # built but not yet added to the graph never collide.
        self._reserved: set[str] = set()
        self._suffix: dict[str, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Recompute every index from the current graph."""
        self._producer = {}
        self._consumers = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self._producer[out] = node
            for name in [*node.input, *subgraph_references(node)]:
                if name:
                    self._consumers.setdefault(name, []).append(node)
        self._initializers = {t.name: t for t in self.graph.initializer}
        self._input_names = {i.name for i in self.graph.input} - set(self._initializers)
        self._deps = {}
        self._const_cache = {}
        self._names = None

    # -- structure ---------------------------------------------------------------------------

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node that outputs ``name``, or None for graph inputs and initializers."""
        return self._producer.get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        """The nodes that read ``name`` (directly or from a subgraph), in graph order."""
        return list(self._consumers.get(name, ()))

    def is_graph_input(self, name: str) -> bool:
        """Whether ``name`` is a graph input that is not also an initializer."""
        return name in self._input_names

    def _graph_names(self) -> set[str]:
        if self._names is None:
            names = set(self._producer) | set(self._initializers) | set(self._consumers)
            names |= {i.name for i in self.graph.input} | {o.name for o in self.graph.output}
            names |= {n.name for n in self.graph.node if n.name}
            self._names = names
        return self._names

    def is_taken(self, name: str) -> bool:
        """Whether ``name`` names a tensor or node of the graph, or was handed out already."""
        return name in self._reserved or name in self._graph_names()

    def ancestors(self, name: str) -> Iterator[onnx.NodeProto]:
        """Nodes whose values ``name`` is computed from, nearest first (each at most once).

        The walk stops at ``Shape``/``Size``: the tensor whose shape is taken does not reach
        ``name`` with its values.
        """
        seen: set[int] = set()
        frontier = [name]
        while frontier:
            tensor = frontier.pop(0)
            node = self._producer.get(tensor)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            if node.op_type in _SHAPE_ONLY_OPS:
                continue
            frontier.extend(i for i in node.input if i)

    # -- values ------------------------------------------------------------------------------

    def constant(self, name: str) -> npt.NDArray[np.generic] | None:
        """The value of ``name`` if it is an initializer, a Constant, or an Identity of one."""
        if name in self._const_cache:
            return self._const_cache[name]
        value: npt.NDArray[np.generic] | None = None
        if name in self._initializers:
            value = numpy_helper.to_array(self._initializers[name])
        else:
            node = self._producer.get(name)
            if node is not None and node.op_type == "Constant":
                value = _constant_node_value(node)
            elif node is not None and node.op_type == "Identity":
                value = self.constant(node.input[0])
        self._const_cache[name] = value
        return value

    def value_deps(self, name: str) -> frozenset[str]:
        """The graph inputs whose *values* flow into ``name`` (shape-only uses do not count)."""
        cached = self._deps.get(name)
        if cached is not None:
            return cached
        # Iterative post-order walk: BERT graphs are a few thousand nodes deep end to end, too
        # deep for recursion.
        stack: list[tuple[str, bool]] = [(name, False)]
        while stack:
            tensor, expanded = stack.pop()
            if tensor in self._deps:
                continue
            node = self._producer.get(tensor)
            if node is None:
                deps = frozenset({tensor}) if tensor in self._input_names else frozenset()
                self._deps[tensor] = deps
                continue
            sources = self._value_sources(node)
            if not expanded:
                stack.append((tensor, True))
                stack.extend((s, False) for s in sources if s not in self._deps)
                continue
            merged: frozenset[str] = frozenset()
            for source in sources:
                merged |= self._deps.get(source, frozenset())
            for out in node.output:
                self._deps[out] = merged
        return self._deps[name]

    def _value_sources(self, node: onnx.NodeProto) -> list[str]:
        if node.op_type in _SHAPE_ONLY_OPS:
            return []
        return [n for n in [*node.input, *sorted(subgraph_references(node))] if n]

    # -- editing -----------------------------------------------------------------------------

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_N``, whichever is free first; it is taken from then on."""
        candidate = base
        counter = self._suffix.get(base, 0)
        while self.is_taken(candidate):
            counter += 1
            candidate = f"{base}_{counter}"
        self._suffix[base] = counter
        self._reserved.add(candidate)
        return candidate

    def reserve(self, name: str) -> str:
        """Take exactly ``name`` (a graph input, output or weight); ``ValueError`` if taken.

        A declared graph output that nothing produces yet (its producer was renamed away) is free
        for the node that is to produce it.
        """
        if self.is_taken(name) and not self._is_unproduced_output(name):
            raise ValueError(f"tensor name {name!r} is already in use")
        self._reserved.add(name)
        return name

    def _is_unproduced_output(self, name: str) -> bool:
        return (
            name not in self._reserved
            and name not in self._producer
            and name not in self._consumers
            and name not in self._initializers
            and all(i.name != name for i in self.graph.input)
            and any(o.name == name for o in self.graph.output)
        )

    def rename_tensor(self, old: str, new: str) -> None:
        """Rename an internal tensor (node outputs and inputs, initializer, value_info)."""
        for node in self.graph.node:
            for field in (node.input, node.output):
                for index, name in enumerate(field):
                    if name == old:
                        field[index] = new
        for tensor in self.graph.initializer:
            if tensor.name == old:
                tensor.name = new
        for value in self.graph.value_info:
            if value.name == old:
                value.name = new
        self.refresh()

    def toposort(self) -> None:
        """Reorder the graph's nodes topologically, keeping the existing order where it is valid."""
        nodes = list(self.graph.node)
        producer_index: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for out in node.output:
                if out:
                    producer_index[out] = index
        emitted = [False] * len(nodes)
        order: list[int] = []
        for root in range(len(nodes)):
            stack: list[tuple[int, bool]] = [(root, False)]
            while stack:
                index, expanded = stack.pop()
                if emitted[index]:
                    continue
                if expanded:
                    emitted[index] = True
                    order.append(index)
                    continue
                stack.append((index, True))
                node = nodes[index]
                for name in reversed([*node.input, *sorted(subgraph_references(node))]):
                    dep = producer_index.get(name)
                    if dep is not None and not emitted[dep] and dep != index:
                        stack.append((dep, False))
        del self.graph.node[:]
        self.graph.node.extend(nodes[i] for i in order)
        self.refresh()

    def prune(self) -> list[onnx.NodeProto]:
        """Delete nodes and initializers that no graph output needs; returns the deleted nodes."""
        needed: set[str] = {o.name for o in self.graph.output}
        live: list[bool] = [False] * len(self.graph.node)
        for index in range(len(self.graph.node) - 1, -1, -1):
            node = self.graph.node[index]
            if any(out in needed for out in node.output if out):
                live[index] = True
                needed.update(n for n in node.input if n)
                needed.update(subgraph_references(node))
        removed = [n for n, keep in zip(self.graph.node, live, strict=True) if not keep]
        kept = [n for n, keep in zip(self.graph.node, live, strict=True) if keep]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        initializers = [t for t in self.graph.initializer if t.name in needed]
        del self.graph.initializer[:]
        self.graph.initializer.extend(initializers)
        self.refresh()
        return removed


def _constant_node_value(node: onnx.NodeProto) -> npt.NDArray[np.generic] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


class NodeEmitter:
    """Creates nodes and initializers with fresh names under one prefix, opset-aware.

    Every op returns the name of its (single) output, so graph code reads like the numpy
    expression it computes. The nodes are collected in :attr:`nodes` (not yet in the graph) so
    the caller adds them in one go; initializers go straight into the graph. Small constants recur
    (axes, 0, 1, shapes): each distinct value gets one initializer per emitter.

    Attributes:
        view: The graph written into.
        prefix: Prepended (with ``/``) to every fresh name; ``""`` for none.
        opset: Default-domain opset of the model (``Unsqueeze`` axes moved to an input in 13).
        nodes: The nodes created so far, in creation (topological) order.
    """

    def __init__(self, view: GraphView, *, opset: int, prefix: str = "") -> None:
        """Emit into ``view``'s graph."""
        self.view = view
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._constants: dict[tuple[object, ...], str] = {}

    def fresh(self, base: str) -> str:
        """A fresh name for ``base`` under the prefix."""
        return self.view.fresh_name(f"{self.prefix}/{base}" if self.prefix else base)

    def weight(self, name: str, array: npt.NDArray[Any]) -> str:
        """An initializer named exactly ``name`` (e.g. a checkpoint parameter's own name)."""
        self.view.graph.initializer.append(numpy_helper.from_array(array, self.view.reserve(name)))
        return name

    def const(self, value: npt.ArrayLike, dtype: npt.DTypeLike, base: str = "const") -> str:
        """An initializer holding ``np.asarray(value, dtype)``; one per distinct value."""
        # np.array, not np.ascontiguousarray: the latter turns scalars into shape (1,).
        array = np.array(value, dtype=dtype, order="C")
        key = ("array", array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(base)
            self.view.graph.initializer.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def typed_const(self, value: float, elem_type: int, base: str = "const") -> str:
        """A scalar initializer of an ONNX element type (float16/bfloat16 included)."""
        key = ("typed", elem_type, value)
        if key not in self._constants:
            name = self.fresh(base)
            self.view.graph.initializer.append(
                onnx.helper.make_tensor(name, elem_type, [], [value])
            )
            self._constants[key] = name
        return self._constants[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        base: str | None = None,
        *,
        out: str | None = None,
        **attrs: Any,
    ) -> str:
        """Add a one-output node; return its output name.

        Args:
            op_type: ONNX operator (default domain).
            inputs: Input tensor names.
            base: Base of the fresh output name (default: the op type in lower case).
            out: Exact output name instead (a graph output); must be free.
            **attrs: Node attributes.
        """
        if out is None:
            output = node_name = self.fresh(base or op_type.lower())
        else:
            output, node_name = self.view.reserve(out), self.fresh(base or op_type.lower())
        self.nodes.append(
            onnx.helper.make_node(op_type, list(inputs), [output], name=node_name, **attrs)
        )
        return output

    def with_axes(
        self,
        op_type: str,
        data: str,
        axes: Sequence[int],
        base: str | None = None,
        **attrs: Any,
    ) -> str:
        """Unsqueeze/Squeeze/ReduceSum-style op; ``axes`` became an input in opset 13."""
        if self.opset >= 13:
            axes_name = self.const(list(axes), np.int64, "axes")
            return self.op(op_type, [data, axes_name], base, **attrs)
        return self.op(op_type, [data], base, axes=list(axes), **attrs)
