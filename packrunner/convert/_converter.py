"""Convert a Hugging Face BERT ONNX export into packrunner's packed form.

packrunner packs several variable-length samples into each row of a fixed ``[batch_size,
seq_len]`` batch. A stock export cannot run such a batch correctly: its attention mask only
hides padding (so packed samples would attend to each other) and its position ids count from the
start of the row (so every sample after the first would get shifted positions). This module
rewrites the exported graph so that:

* ``attention_mask`` carries per-token *segment ids* (``1, 2, 3 ...`` for the samples of a row,
  ``0`` on padding) and attention is block-diagonal: the extended-mask subgraph, whatever form
  the exporter gave it, is replaced at the point where it is added to the attention scores (just
  before Softmax) by a bias built from the segment ids::

      key     = Where(m > 0, m, -1)                           # padding keys match no query
      blocked = Not(Equal(Unsqueeze(m, 2), Unsqueeze(key, 1)))  # [B, S, S]
      bias    = Unsqueeze(Cast(blocked) * -10000, 1)            # [B, 1, S, S]

  The bias is finite on purpose: a row that is all padding then gets a uniform softmax (finite,
  and discarded) instead of NaN.
* ``position_ids`` is a graph input (restarting at 0 for each sample), replacing the internal
  ``Range``/``Slice`` of a position buffer that fed the position-embedding ``Gather``.
* all four inputs are int32 ``[batch_size, seq_len]`` (packrunner's feeds) and every output has a
  static shape.

Two other modes share the same machinery: ``attention="padding"`` keeps the exported 0/1 mask
(only shapes, dtypes and ``position_ids`` change; the negative control), and
``attention="unpack_repack"`` builds packrunner's *stream* model (PopRT "end-to-end"): samples lie
back to back across rows, ``unpack_info`` gives their lengths, token-wise layers run on the
stream and each attention block on a per-sample view (see :mod:`packrunner.convert._unpack`).

The subgraphs are found by data flow, not by node names (PopRT's example deletes ``Shape_7``,
``Gather_9``... by name, which breaks with the next exporter version):

* the position-embedding ``Gather`` is the ``Gather`` over a constant ``[positions, hidden]`` table
  whose indices depend on no graph input's values and come from a ``Range`` or an arange-valued
  constant (the ``position_ids`` buffer);
* the mask is, for every attention ``Softmax`` (one whose scores come from a ``MatMul`` of two
  computed tensors), the operand of the ``Add`` before it whose value depends on
  ``attention_mask`` and on no other input. Shape-only uses (``Shape``, ``Size``) do not count as
  value dependencies, which is what lets the same rule match the classic
  ``Unsqueeze-Unsqueeze-Cast-Sub-Mul`` mask, transformers 5's ``Where``/``Expand`` mask built from
  ``Shape(hidden_states)``, and the per-layer ``Where(mask, 0, -inf)`` of SDPA exports.

Example::

    from packrunner.convert import convert_file
    convert_file("bert_squad.onnx", "bert_squad_packed.onnx", batch_size=16, seq_len=256)

or from the command line: ``packrunner convert bert_squad.onnx bert_squad_packed.onnx``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx

# onnx.load raises protobuf's DecodeError for a file that is not a model; protobuf ships no stubs.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from onnx import TensorProto, helper, shape_inference

from packrunner.convert._unpack import UNPACK_INFO, AttentionSite, UnpackError, unpack_attention
from packrunner.errors import ConversionError
from packrunner.graphs._graph import MASK_BIAS, GraphView, NodeEmitter, default_opset

__all__ = [
    "PACKED_INPUT_NAMES",
    "AttentionMode",
    "convert_file",
    "convert_to_packed",
]

logger = logging.getLogger(__name__)

#: The inputs of a converted model, in order; each is int32 ``[batch_size, seq_len]``.
PACKED_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

AttentionMode = Literal["block_diagonal", "padding", "unpack_repack"]
_ATTENTION_MODES: tuple[AttentionMode, ...] = ("block_diagonal", "padding", "unpack_repack")

# Ops the attention scores pass through between the QK^T MatMul and the Softmax in the exports we
# know (scale, mask add, dtype casts, head reshapes). The search for the mask Add only walks these.
_SCORE_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Reshape", "Transpose", "Where"})
_SCORE_PATH_DEPTH = 6
# Consumers that accept int32 indices/data as well as int64, so a converted int32 input can feed
# them directly instead of through a Cast. (input slot, or None for "any slot")
_INT32_OK: dict[str, int | None] = {"Gather": 1, "Shape": None, "Size": None}
_FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
)
_INT_TYPES = frozenset({TensorProto.INT32, TensorProto.INT64})


@dataclass(frozen=True, slots=True)
class _MaskSite:
    """One place where the old extended mask is added to attention scores."""

    add: onnx.NodeProto
    operand: int  # which input of ``add`` is the mask
    softmax: onnx.NodeProto  # the attention Softmax the masked scores feed


def convert_to_packed(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    attention: AttentionMode = "block_diagonal",
    keep_row_outputs: bool = False,
    max_valid_num: int = 40,
) -> onnx.ModelProto:
    """Rewrite a Hugging Face BERT export for packed ``[batch_size, seq_len]`` batches.

    Args:
        model: The exported model, or a path to it (external data next to it is loaded). A
            ``ModelProto`` is copied, never modified.
        batch_size: Rows per batch (the fixed first dimension of every input).
        seq_len: Tokens per row (the fixed second dimension). At most the number of rows of the
            position-embedding table.
        attention: ``"block_diagonal"`` (default) replaces the mask so that ``attention_mask``
            holds segment ids and each sample attends only to itself. ``"padding"`` keeps the
            exported 0/1 padding mask (only shapes, dtypes and ``position_ids`` change): feed it
            ``attention_mask > 0``; packed samples then see each other, which makes it the negative
            control for the block-diagonal model. ``"unpack_repack"`` is packrunner's stream mode
            (PopRT "end-to-end"): the token inputs hold samples back to back, possibly across
            rows, ``attention_mask`` is replaced by ``unpack_info`` ``[max_valid_num]`` int32
            (the samples' lengths, 0 for unused slots), token-wise layers run on the stream and
            each attention block on a per-sample ``[max_valid_num, seq_len]`` view; per-token
            outputs are ``[max_valid_num, seq_len, ...]``, slot ``k`` holding sample ``k`` from
            position 0 and zeros past its length. Needs opset >= 13.
        keep_row_outputs: Outputs with no sequence axis (``pooler_output``: one vector per row)
            are dropped by default, because in a packed row they describe only the row's first
            sample. Pass True to keep them (shape ``[batch_size, ...]``; not with
            ``"unpack_repack"``).
        max_valid_num: Sample slots of an ``"unpack_repack"`` model; unused otherwise.

    Returns:
        The converted model, already validated with ``onnx.checker.check_model(full_check=True)``
        and ``onnx.shape_inference.infer_shapes(strict_mode=True)``; its value_info holds the
        inferred static shapes.

    Raises:
        ConversionError: The graph lacks an input, the position-embedding ``Gather`` or the
            attention mask subgraph, or the result fails validation. The message names what was
            not found.
        ValueError: An argument is out of range.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if attention not in _ATTENTION_MODES:
        raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}")
    if max_valid_num < 1:
        raise ValueError(f"max_valid_num must be >= 1, got {max_valid_num}")
    if attention == "unpack_repack" and keep_row_outputs:
        raise ValueError("keep_row_outputs cannot be combined with attention='unpack_repack'")

    proto = _load(model)
    try:
        opset = default_opset(proto)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    if opset < 11:
        raise ConversionError(f"opset {opset} is too old; need ai.onnx opset >= 11")

    converter = _Converter(proto, opset=opset, batch_size=batch_size, seq_len=seq_len)
    if attention != "unpack_repack":
        converter.run(attention=attention, keep_row_outputs=keep_row_outputs)
        return _validate(proto)
    if opset < 13:
        raise ConversionError(f"attention='unpack_repack' needs ai.onnx opset >= 13, got {opset}")
    # Two steps: first the ordinary static conversion (padding mask kept, mask sites checked),
    # whose strict shape inference gives every tensor a static shape; then the attention blocks
    # of that static graph are rewritten around those shapes.
    converter.run(attention="padding", keep_row_outputs=False, require_mask=True)
    static = _validate(proto)
    unpacker = _Converter(static, opset=opset, batch_size=batch_size, seq_len=seq_len)
    unpacker.run_unpack(max_valid_num)
    return _validate(static)


def convert_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    attention: AttentionMode = "block_diagonal",
    keep_row_outputs: bool = False,
    max_valid_num: int = 40,
) -> onnx.ModelProto:
    """Convert the model at ``in_path`` and write the result to ``out_path``.

    Args:
        in_path: The exported model.
        out_path: Where to write the converted model (parent directories are created). Models
            over 2 GB are written with their weights in ``<out_path>.data`` beside it.
        batch_size: As :func:`convert_to_packed`.
        seq_len: As :func:`convert_to_packed`.
        attention: As :func:`convert_to_packed`.
        keep_row_outputs: As :func:`convert_to_packed`.
        max_valid_num: As :func:`convert_to_packed`.

    Returns:
        The converted model that was written.

    Raises:
        ConversionError: As :func:`convert_to_packed`.
    """
    converted = convert_to_packed(
        in_path,
        batch_size=batch_size,
        seq_len=seq_len,
        attention=attention,
        keep_row_outputs=keep_row_outputs,
        max_valid_num=max_valid_num,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A single protobuf cannot exceed 2 GB; BERT-large is well under, but don't fail on bigger.
    large = converted.ByteSize() > 2**31 - 2**26
    onnx.save_model(
        converted,
        str(out),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{out.name}.data",
    )
    return converted


# --------------------------------------------------------------------------------------------
# implementation


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return onnx.load(os.fspath(model))
    except DecodeError as exc:
        raise ConversionError(f"{os.fspath(model)} is not an ONNX model: {exc}") from exc


def _validate(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Check the converted model; return it with inferred (static) value_info."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as exc:
        raise ConversionError(f"the converted graph failed validation: {exc}") from exc


def _dims(value: onnx.ValueInfoProto) -> list[str | int | None] | None:
    """A value's dims as dim_param / dim_value / None (unknown); None if it has no shape."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[str | int | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


class _Converter:
    """One conversion: finds the patterns first, then edits ``proto`` in place."""

    def __init__(self, proto: onnx.ModelProto, *, opset: int, batch_size: int, seq_len: int):
        self.proto = proto
        self.graph = proto.graph
        self.opset = opset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.view = GraphView(self.graph)
        self.taken: set[str] = set()
        self.new_nodes: list[onnx.NodeProto] = []
        # Types (and, for outputs, shapes) of every tensor, from shape inference on the original
        # graph; non-strict because a raw export may not fully infer.
        inferred = shape_inference.infer_shapes(proto, strict_mode=False)
        self.values: dict[str, onnx.ValueInfoProto] = {}
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            self.values[value.name] = value
        self.inputs = {i.name: i for i in self.graph.input if self.view.is_graph_input(i.name)}

    # -- driver ------------------------------------------------------------------------------

    def run(
        self, *, attention: AttentionMode, keep_row_outputs: bool, require_mask: bool = False
    ) -> None:
        """Static shapes, int32 inputs, ``position_ids`` input, and the mask per ``attention``.

        Args:
            attention: ``"block_diagonal"`` or ``"padding"``.
            keep_row_outputs: See :func:`convert_to_packed`.
            require_mask: In padding mode, still fail if the mask subgraph is not found.
        """
        self._check_inputs()
        batch_dim, seq_dim = self._token_axes()
        position_gather = None if "position_ids" in self.inputs else self._find_position_gather()
        block = attention == "block_diagonal"
        # Padding mode leaves the mask as exported; it is still looked for when required (the
        # first step of unpack_repack), so that a graph without one fails before any edit.
        sites = self._find_mask_sites() if block or require_mask else []
        layouts = self._output_layouts(batch_dim, seq_dim)
        dropped = [] if keep_row_outputs else [n for n, kind in layouts.items() if kind == "row"]
        if len(dropped) == len(layouts):
            raise ConversionError(
                f"no per-token output: every output ({dropped}) has no sequence axis; pass "
                "keep_row_outputs=True to convert anyway"
            )

        # Everything was found: now edit.
        if block:
            self._replace_mask(sites)
        if position_gather is not None:
            self._expose_position_ids(position_gather)
        if dropped:
            logger.warning(
                "dropping per-row outputs %s: in a packed row they describe only its first sample",
                dropped,
            )
            kept = [o for o in self.graph.output if o.name not in dropped]
            del self.graph.output[:]
            self.graph.output.extend(kept)
        self.graph.node.extend(self.new_nodes)
        self.view.toposort()  # prune() sweeps in topological order
        self.view.prune()
        if block:
            self._check_mask_fully_replaced()
        self._retype_inputs()
        self._fix_output_shapes(batch_dim, seq_dim)
        # Stale intermediate shapes (symbolic, or of removed tensors) would only get in the way of
        # inference on the static graph; the returned model gets fresh ones.
        del self.graph.value_info[:]
        self.view.toposort()
        props = {p.key: p.value for p in self.proto.metadata_props}
        props["packrunner.packed"] = (
            f"batch_size={self.batch_size};seq_len={self.seq_len};attention={attention}"
        )
        helper.set_model_props(self.proto, props)

    def run_unpack(self, max_valid_num: int) -> None:
        """Rewrite a static padding-mode conversion into an unpack/repack model."""
        sites = [
            AttentionSite(
                softmax=site.softmax,
                mask_add=site.add,
                mask_operand=site.operand,
                bias_type=self._bias_type(site),
            )
            for site in self._find_mask_sites()
        ]
        self._free_input_name(UNPACK_INFO)
        shapes: dict[str, list[int]] = {}
        for value in [*self.graph.value_info, *self.graph.input, *self.graph.output]:
            dims = _dims(value)
            if dims is not None and all(isinstance(d, int) for d in dims):
                shapes[value.name] = [int(d) for d in dims if isinstance(d, int)]
        try:
            new_nodes, output_shapes = unpack_attention(
                self.view,
                self.taken,
                sites,
                shapes,
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                max_valid_num=max_valid_num,
                opset=self.opset,
            )
        except UnpackError as exc:
            raise ConversionError(f"cannot unpack/repack attention: {exc}") from exc
        self.graph.node.extend(new_nodes)
        self.graph.input.append(
            helper.make_tensor_value_info(UNPACK_INFO, TensorProto.INT32, [max_valid_num])
        )
        self.view.toposort()
        self.view.prune()
        # The stream carries no attention_mask: once the old mask subgraph is gone, nothing may
        # still read it.
        readers = self.view.consumers("attention_mask")
        if readers:
            names = [f"{n.op_type} {n.name or n.output[0]!r}" for n in readers]
            raise ConversionError(
                f"attention mask subgraph not found in full: attention_mask still feeds {names}"
            )
        kept_inputs = [i for i in self.graph.input if i.name != "attention_mask"]
        del self.graph.input[:]
        self.graph.input.extend(kept_inputs)
        for index, output in enumerate(self.graph.output):
            self.graph.output[index].CopyFrom(
                helper.make_tensor_value_info(
                    output.name, output.type.tensor_type.elem_type, output_shapes[output.name]
                )
            )
        del self.graph.value_info[:]
        self.view.toposort()
        props = {p.key: p.value for p in self.proto.metadata_props}
        props["packrunner.packed"] = (
            f"batch_size={self.batch_size};seq_len={self.seq_len};attention=unpack_repack;"
            f"max_valid_num={max_valid_num}"
        )
        helper.set_model_props(self.proto, props)

    # -- inputs --------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        available = sorted(self.inputs)
        for name in ("input_ids", "attention_mask"):
            if name not in self.inputs:
                raise ConversionError(
                    f"graph input {name!r} not found (inputs: {available}); expected a Hugging "
                    "Face BERT export with input_ids, attention_mask[, token_type_ids]"
                )
        for name in PACKED_INPUT_NAMES:
            value = self.inputs.get(name)
            if value is None:
                continue
            elem_type = value.type.tensor_type.elem_type
            if elem_type not in _INT_TYPES:
                raise ConversionError(
                    f"graph input {name!r} has type "
                    f"{helper.tensor_dtype_to_string(elem_type)}; expected int32 or int64"
                )
            dims = _dims(value)
            if dims is not None and len(dims) != 2:
                raise ConversionError(
                    f"graph input {name!r} has rank {len(dims)}; expected [batch, sequence]"
                )

    def _token_axes(self) -> tuple[str | int | None, str | int | None]:
        """The batch and sequence dims of ``input_ids`` as exported (names or sizes)."""
        dims = _dims(self.inputs["input_ids"]) or [None, None]
        return dims[0], dims[1]

    def _retype_inputs(self) -> None:
        """Make the packed inputs int32 [B, S], casting back where a consumer needs int64."""
        ours = {n.name for n in self.new_nodes}  # protobuf copies on extend(): match by name
        self.view.refresh()
        for index, value in enumerate(self.graph.input):
            if value.name not in PACKED_INPUT_NAMES:
                continue
            old_type = value.type.tensor_type.elem_type
            if old_type != TensorProto.INT32:
                cast_name: str | None = None
                for node in self.view.consumers(value.name):
                    if node.name in ours:
                        continue
                    for slot, name in enumerate(node.input):
                        if name != value.name or self._accepts_int32(node, slot):
                            continue
                        if cast_name is None:
                            cast_name = self.view.fresh_name(f"{value.name}_int64", self.taken)
                            self.graph.node.append(
                                helper.make_node(
                                    "Cast",
                                    [value.name],
                                    [cast_name],
                                    name=self.view.fresh_name(f"{value.name}_Cast", self.taken),
                                    to=old_type,
                                )
                            )
                        node.input[slot] = cast_name
            self.graph.input[index].CopyFrom(
                helper.make_tensor_value_info(
                    value.name, TensorProto.INT32, [self.batch_size, self.seq_len]
                )
            )
        self.view.refresh()

    @staticmethod
    def _accepts_int32(node: onnx.NodeProto, slot: int) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _INT32_OK:
            return False
        allowed = _INT32_OK[node.op_type]
        return allowed is None or allowed == slot

    # -- position ids ------------------------------------------------------------------------

    def _find_position_gather(self) -> onnx.NodeProto:
        candidates: list[onnx.NodeProto] = []
        for node in self.graph.node:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            table = self.view.constant(node.input[0])
            if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis != 0:
                continue
            indices = node.input[1]
            if self.view.value_deps(indices):
                continue  # word / token-type embeddings: indices come from the inputs
            if self._looks_like_positions(indices):
                candidates.append(node)
        if not candidates:
            raise ConversionError(
                "no position-embedding Gather found: expected a Gather over a constant "
                "[max_positions, hidden] table whose indices come from a Range or a position_ids "
                "buffer (Slice/Expand of an arange constant) and not from input_ids, "
                "token_type_ids or attention_mask"
            )
        if len(candidates) > 1:
            names = [n.name or n.output[0] for n in candidates]
            raise ConversionError(f"several position-embedding Gather candidates found: {names}")
        gather = candidates[0]
        table = self.view.constant(gather.input[0])
        assert table is not None  # checked above
        if self.seq_len > table.shape[0]:
            raise ConversionError(
                f"seq_len {self.seq_len} exceeds the {table.shape[0]} rows of the "
                f"position-embedding table {gather.input[0]!r}"
            )
        logger.info("position-embedding Gather: %r", gather.name or gather.output[0])
        return gather

    def _free_input_name(self, name: str) -> None:
        """Rename an internal tensor that already has the name a new graph input needs."""
        if name in self.view.all_names():  # e.g. a traced ``position_ids`` variable
            self.view.rename_tensor(name, self.view.fresh_name(f"{name}_internal", self.taken))

    def _expose_position_ids(self, gather: onnx.NodeProto) -> None:
        self._free_input_name("position_ids")
        gather.input[1] = "position_ids"
        self.graph.input.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT32, [None, None])
        )
        self.inputs["position_ids"] = self.graph.input[-1]
        logger.info("position_ids now feeds Gather %r", gather.name or gather.output[0])

    def _looks_like_positions(self, indices: str) -> bool:
        """Whether constant-only indices are positions: a Range, or an arange-valued buffer.

        This is what tells the position Gather from a token-type Gather fed by a constant zeros
        buffer (exports made without a token_type_ids input).
        """
        value = self.view.constant(indices)
        if value is not None:
            return _is_arange(value)
        for node in self.view.ancestors(indices):
            if node.op_type == "Range":
                return True
            for name in node.input:
                const = self.view.constant(name) if name else None
                if const is not None and const.size > 1 and _is_arange(const):
                    return True
        return False

    # -- attention mask ----------------------------------------------------------------------

    def _find_mask_sites(self) -> list[_MaskSite]:
        softmaxes = [
            n
            for n in self.graph.node
            if n.op_type == "Softmax" and n.domain in ("", "ai.onnx") and self._is_attention(n)
        ]
        if not softmaxes:
            raise ConversionError(
                "attention mask subgraph not found: no attention Softmax (a Softmax over "
                "MatMul(Q, K^T) scores) in the graph; fused attention ops are not supported"
            )
        sites: list[_MaskSite] = []
        for softmax in softmaxes:
            label = softmax.name or softmax.output[0]
            site = self._mask_site(softmax)
            if site is None:
                raise ConversionError(
                    f"attention mask subgraph not found: nothing that depends only on "
                    f"attention_mask is added to the scores before Softmax {label!r}"
                )
            sites.append(site)
        logger.info(
            "attention mask added before %d Softmax nodes: %s",
            len(sites),
            [s.softmax.name or s.softmax.output[0] for s in sites],
        )
        return sites

    def _score_path(self, tensor: str) -> list[onnx.NodeProto]:
        """Producers along the score path of ``tensor``, nearest first, bounded in depth."""
        path: list[onnx.NodeProto] = []
        frontier = [(tensor, 0)]
        seen: set[int] = set()
        while frontier:
            name, depth = frontier.pop(0)
            node = self.view.producer(name)
            if node is None or id(node) in seen or depth > _SCORE_PATH_DEPTH:
                continue
            seen.add(id(node))
            path.append(node)
            if node.op_type in _SCORE_PATH_OPS:
                frontier.extend(
                    (i, depth + 1) for i in node.input if i and self.view.constant(i) is None
                )
        return path

    def _is_attention(self, softmax: onnx.NodeProto) -> bool:
        """A Softmax over scores that come from a MatMul of two computed tensors (Q @ K^T)."""
        for node in self._score_path(softmax.input[0]):
            if node.op_type == "MatMul" and all(self.view.constant(i) is None for i in node.input):
                return True
        return False

    def _mask_site(self, softmax: onnx.NodeProto) -> _MaskSite | None:
        mask_only = frozenset({"attention_mask"})
        for node in self._score_path(softmax.input[0]):
            if node.op_type != "Add" or len(node.input) != 2:
                continue
            deps = [self.view.value_deps(i) for i in node.input]
            for operand in (0, 1):
                other = deps[1 - operand]
                if deps[operand] == mask_only and not other <= mask_only:
                    return _MaskSite(add=node, operand=operand, softmax=softmax)
        return None

    def _bias_type(self, site: _MaskSite) -> int:
        """Element type for the new bias: the old mask's (float16 exports stay float16)."""
        old = site.add.input[site.operand]
        elem_type = self._elem_type(old) or self._elem_type(site.add.input[1 - site.operand])
        return elem_type if elem_type in _FLOAT_TYPES else TensorProto.FLOAT

    def _replace_mask(self, sites: list[_MaskSite]) -> None:
        biases: dict[int, str] = {}
        for site in sites:
            elem_type = self._bias_type(site)
            if elem_type not in biases:
                biases[elem_type] = self._build_block_bias(elem_type)
            site.add.input[site.operand] = biases[elem_type]

    def _build_block_bias(self, elem_type: int) -> str:
        """Emit the nodes computing the [B, 1, S, S] block-diagonal bias; return its name."""
        emit = NodeEmitter(self.view, self.taken, prefix="packrunner/block_mask", opset=self.opset)
        # The bias is the only [B, S, S] work packing adds to a batch, so it is built with as
        # few full-size ops as possible: padding keys get segment -1, which no query equals
        # (one Equal instead of Equal, Greater and And), and Cast + Mul replaces a scalar-branch
        # Where, which onnxruntime runs ~3x slower. Packed overhead per batch: 9% -> 4%.
        is_token = emit.op(
            "Greater", ["attention_mask", emit.const("zero", 0, np.int32)], "is_token"
        )
        key_ids = emit.op(
            "Where", [is_token, "attention_mask", emit.const("minus_one", -1, np.int32)], "key_ids"
        )  # [B, S]
        query = emit.with_axes("Unsqueeze", "attention_mask", [2], "query_segment")  # [B, S, 1]
        key = emit.with_axes("Unsqueeze", key_ids, [1], "key_segment")  # [B, 1, S]
        blocked = emit.op("Not", [emit.op("Equal", [query, key], "same_segment")], "blocked")
        blocked_f = emit.op("Cast", [blocked], "blocked_f", to=elem_type)
        drop = emit.typed_const("drop", MASK_BIAS, elem_type)
        bias = emit.op("Mul", [blocked_f, drop], "bias")  # [B, S, S]
        bias_4d = emit.with_axes("Unsqueeze", bias, [1], "bias_4d")  # broadcasts over heads
        self.new_nodes.extend(emit.nodes)
        return bias_4d

    def _check_mask_fully_replaced(self) -> None:
        ours = {n.name for n in self.new_nodes}  # protobuf copies on extend(): match by name
        others = [n for n in self.view.consumers("attention_mask") if n.name not in ours]
        if others:
            names = [f"{n.op_type} {n.name or n.output[0]!r}" for n in others]
            raise ConversionError(
                "attention mask subgraph not found in full: after replacing the mask added "
                f"before Softmax, attention_mask still feeds {names}; those uses would read "
                "segment ids as a 0/1 mask"
            )

    def _elem_type(self, name: str) -> int | None:
        value = self.values.get(name)
        if value is not None and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
        const = self.view.constant(name)
        if const is not None:
            return int(helper.np_dtype_to_tensor_dtype(const.dtype))
        return None

    # -- outputs -----------------------------------------------------------------------------

    def _output_dims(self, name: str) -> list[str | int | None] | None:
        declared = next(o for o in self.graph.output if o.name == name)
        dims = _dims(declared)
        if dims is None and name in self.values:
            dims = _dims(self.values[name])
        return dims

    def _output_layouts(
        self, batch_dim: str | int | None, seq_dim: str | int | None
    ) -> dict[str, Literal["token", "row"]]:
        """Classify each output as per token ([batch, seq, ...]) or per row ([batch, ...])."""
        layouts: dict[str, Literal["token", "row"]] = {}
        for output in self.graph.output:
            dims = self._output_dims(output.name)
            if dims is None or batch_dim is None or not dims or dims[0] != batch_dim:
                raise ConversionError(
                    f"cannot tell the layout of output {output.name!r} (dims {dims}); expected "
                    f"[{batch_dim}, {seq_dim}, ...] as in input_ids"
                )
            layouts[output.name] = "token" if len(dims) >= 2 and dims[1] == seq_dim else "row"
        return layouts

    def _fix_output_shapes(self, batch_dim: str | int | None, seq_dim: str | int | None) -> None:
        """Give every output its static shape: mapped from the input axes, else inferred."""
        inferred: dict[str, list[str | int | None] | None] | None = None
        for index, output in enumerate(self.graph.output):
            dims = self._output_dims(output.name) or []
            shape: list[int] = []
            for axis, dim in enumerate(dims):
                if dim == batch_dim and axis == 0:
                    shape.append(self.batch_size)
                elif dim == seq_dim and axis == 1:
                    shape.append(self.seq_len)
                elif isinstance(dim, int):
                    shape.append(dim)
                else:
                    # Some other symbolic axis: let shape inference on the now-static inputs
                    # compute it (done at most once, it serialises the whole model).
                    if inferred is None:
                        inferred = self._infer_static_output_dims()
                    guess = inferred.get(output.name) or []
                    value = guess[axis] if axis < len(guess) else None
                    if not isinstance(value, int):
                        raise ConversionError(
                            f"cannot determine axis {axis} ({dim!r}) of output {output.name!r} "
                            "for the static shape"
                        )
                    shape.append(value)
            self.graph.output[index].CopyFrom(
                helper.make_tensor_value_info(output.name, output.type.tensor_type.elem_type, shape)
            )

    def _infer_static_output_dims(self) -> dict[str, list[str | int | None] | None]:
        probe = onnx.ModelProto()
        probe.CopyFrom(self.proto)
        del probe.graph.value_info[:]
        for output in probe.graph.output:
            output.type.tensor_type.ClearField("shape")
        inferred = shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
        return {o.name: _dims(o) for o in inferred.graph.output}


def _is_arange(value: npt.NDArray[np.generic]) -> bool:
    """Whether every 1-D slice along the last axis is 0, 1, 2, ... (a position_ids buffer)."""
    if value.ndim == 0 or value.shape[-1] < 2 or not np.issubdtype(value.dtype, np.integer):
        return False
    rows = value.reshape(-1, value.shape[-1])
    return bool(np.all(rows == np.arange(value.shape[-1], dtype=rows.dtype)))
