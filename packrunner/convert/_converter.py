"""Convert a Hugging Face encoder ONNX export into one of packrunner's input forms.

packrunner packs several variable-length samples into each row of a fixed ``[batch_size,
seq_len]`` batch. A stock export cannot run such a batch correctly: its attention mask only
hides padding (so packed samples would attend to each other) and its position ids count from the
start of the row (so every sample after the first would get shifted positions). The converter
rewrites the exported graph into an :class:`~packrunner.InputForm`:

* ``InputForm.PACKED`` (the default): ``attention_mask`` carries per-token *segment ids*
  (``1, 2, 3 ...`` for the samples of a row, ``0`` on padding) and attention is block-diagonal:
  the extended-mask subgraph, whatever form the exporter gave it, is replaced at the point where
  it is added to the attention scores (just before Softmax) by
  :func:`packrunner.graphs.block_diagonal_bias` of the segment ids, the bias the model builder
  uses too. The bias is finite on purpose: a row that is all padding then gets a uniform softmax
  (finite, and discarded) instead of NaN.
* ``InputForm.PADDED``: the exported 0/1 mask is kept (only shapes, dtypes and ``position_ids``
  change); the negative control for the packed model.
* ``InputForm.UNPACK_REPACK`` (PopRT "end-to-end"): samples lie back to back across rows,
  ``unpack_info`` gives their lengths, token-wise layers run on the stream and each attention
  block on a per-sample view (see :mod:`packrunner.convert._unpack`).

Per-sequence heads (classifiers, rerankers, pooled embedders: outputs with one row per sample)
get their pooling rewritten per segment or sample slot (:mod:`packrunner.convert._pooling`), and
every converted model declares its output layouts in its metadata
(:data:`packrunner.devices.onnx.LAYOUTS_METADATA_KEY`), which :class:`~packrunner.OnnxDevice`
reads.

In every form ``position_ids`` is a graph input counting ``0 .. L-1`` within each sample; the
converted graph adds the table row of a sample's first token itself (0 for the BERT family's
range-indexed tables, ``padding_idx + 1`` for the RoBERTa family's ``cumsum(input_ids != pad) +
pad``), so whoever feeds it never needs to know the kind (see
:mod:`packrunner.convert._match_positions`: only the table summed into the word embeddings is
ever rewritten). Relative-position buckets (DeBERTa-v3, MPNet's bias) and rotary angles
(ModernBERT) depend on ``i - j`` only and stay valid on the whole packed row: they are checked,
kept, and ``position_ids`` is then an input nothing reads (see
:mod:`packrunner.convert._match_relative`); masks beyond a padding bias (masked_fill, a
sliding-window band in the same operand, ``embeddings * mask``) are handled by
:mod:`packrunner.convert._mask_forms`. All token inputs are int32 ``[batch_size, seq_len]``
(packrunner's feeds) and every output has a static shape. A conversion is returned only after
it passed its own equivalence check (:mod:`packrunner.convert._selfcheck`): packed outputs equal
to the original's on each sample alone, else :class:`ConversionError`.

Attention computed by one node (the ONNX ``Attention`` op, onnxruntime's fused ``Attention`` /
``MultiHeadAttention``) takes the same bias through the op's additive mask input
(:mod:`packrunner.convert._attention_ops`); ``precision="fp16"`` converts the result to fp16 and
self-checks it at the fp16 tolerance (:mod:`packrunner.convert._precision`).

The subgraphs are found by data flow, not by node names (PopRT's example deletes ``Shape_7``,
``Gather_9``... by name, which breaks with the next exporter version). The finders (``_match``,
``_match_cores``, ``_match_positions``) return what they found as plain dataclasses before
anything is edited; the rewrites (``_rewrite``, ``_unpack``) apply it; :func:`convert_to_packed`
runs them in one pass (``_convert``), then the self-check.

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

import numpy as np
import onnx

# onnx.load raises protobuf's DecodeError for a file that is not a model; protobuf ships no stubs.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from onnx import TensorProto, helper, shape_inference, version_converter

from packrunner.config import InputForm
from packrunner.convert._attention_ops import (
    attention_op_nodes,
    find_attention_ops,
    use_block_diagonal_bias_in_ops,
)
from packrunner.convert._mask_forms import (
    add_mask_structure,
    additive_where_masks,
    binary_mask_reads,
    find_mask_structure,
)
from packrunner.convert._match import (
    PACKED_INPUT_NAMES,
    OutputKind,
    TensorTypes,
    classify_outputs,
    dims,
    find_inputs,
    find_mask_sites,
    output_layout,
    refuse_fused_ops,
)
from packrunner.convert._match_cores import find_attention_cores
from packrunner.convert._match_pooling import Pooling, find_pooling
from packrunner.convert._match_positions import (
    EmbeddingSum,
    PositionLookup,
    find_embedding_sum,
    find_position_lookup,
)
from packrunner.convert._match_relative import (
    RowInvariantPositions,
    find_row_invariant_positions,
)
from packrunner.convert._pooling import expose_hidden, pool_per_segment, pool_per_slot
from packrunner.convert._precision import Precision, to_float16
from packrunner.convert._rewrite import (
    drop_outputs,
    expose_position_ids,
    free_name,
    require_mask_replaced,
    reroute_shape_reads,
    retype_inputs,
    set_static_output_shapes,
    unwrap_upgraded_softmax,
    use_block_diagonal_bias,
)
from packrunner.convert._selfcheck import check_equivalence
from packrunner.convert._unpack import unpack_attention
from packrunner.devices.onnx import LAYOUTS_METADATA_KEY, format_output_layouts
from packrunner.errors import ConversionError
from packrunner.graphs import UNPACK_INFO, GraphView, default_opset, evaluate

__all__ = [
    "PACKED_INPUT_NAMES",
    "convert_file",
    "convert_to_packed",
    "explain",
]

logger = logging.getLogger("packrunner.convert")

#: Metadata key of the converter's account of a conversion (see :func:`explain`).
EXPLAIN_KEY = "packrunner.explain"

# The opset the unpack/repack rewrite works at; older exports are upgraded to it. The per-slot
# rewrite emits opset-13 ops (axes as inputs) and needs every attention tensor's static shape,
# which onnx's shape inference propagates through the exporters' Shape -> Gather -> Unsqueeze ->
# Concat -> Reshape chains only from opset 14 on (at 13 the heads' reshapes stay unknown and the
# attention context cannot be followed); 17 is what the exporters emit by default.
_UNPACK_OPSET = 17


def convert_to_packed(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    form: InputForm | str = InputForm.PACKED,
    keep_row_outputs: bool = False,
    max_valid_num: int = 40,
    position_offset: int | None = None,
    precision: Precision | str = Precision.FP32,
) -> onnx.ModelProto:
    """Rewrite a Hugging Face encoder export for packed ``[batch_size, seq_len]`` batches.

    Args:
        model: The exported model, or a path to it (external data next to it is loaded). A
            ``ModelProto`` is copied, never modified.
        batch_size: Rows per batch (the fixed first dimension of every input).
        seq_len: Tokens per row (the fixed second dimension). At most the number of rows of the
            position-embedding table.
        form: The :class:`~packrunner.InputForm` to convert to (or its value). ``"packed"``
            (default) replaces the mask so that ``attention_mask`` holds segment ids and each
            sample attends only to itself. ``"padded"`` keeps the exported 0/1 padding mask (only
            shapes, dtypes and ``position_ids`` change): feed it ``attention_mask > 0``; packed
            samples then see each other, which makes it the negative control for the packed
            model. ``"unpack_repack"``: the token inputs hold samples back to back, possibly
            across rows, ``attention_mask`` is replaced by ``unpack_info`` ``[max_valid_num]``
            int32 (the samples' lengths, 0 for unused slots), token-wise layers run on the stream
            and each attention block on a per-sample ``[max_valid_num, seq_len]`` view; per-token
            outputs are ``[max_valid_num, seq_len, ...]``, slot ``k`` holding sample ``k`` from
            position 0 and zeros past its length. Exports below opset 17 are upgraded to it.
        keep_row_outputs: Outputs with no sequence axis (``logits`` of a sequence classifier,
            ``pooler_output``, a ``sentence_embedding``: one value per sequence) are computed
            per sample by default: their pooling (first token or mean, see
            :mod:`packrunner.convert._match_pooling`) is rewritten per segment, giving
            ``[batch_size, seq_len, ...]`` (``OutputLayout.SEGMENTS``; unpack/repack:
            ``[max_valid_num, ...]``, ``SAMPLES``). Any other pooling is refused when nothing
            else is left, else that output is dropped. Pass True to keep them per row instead
            (shape ``[batch_size, ...]``, exact with ``algorithm=padded`` only; not with
            ``"unpack_repack"``). The padded form never rewrites them (dropped unless kept).
        max_valid_num: Sample slots of an ``"unpack_repack"`` model; unused otherwise.
        position_offset: For an export that takes ``position_ids`` itself: the position-table
            row of a sample's first token (RoBERTa family: ``padding_idx + 1``). None infers it
            (see :func:`~packrunner.convert._match_positions.find_position_lookup`). The converted
            graph's ``position_ids`` input is always ``0 .. L-1`` per sample, whatever the kind.
        precision: ``"fp32"`` (default) keeps the export's precision; ``"fp16"`` (PopRT's
            ``--precision fp16``) converts weights and activations to fp16, inputs stay int32
            and outputs fp32, and the self-check holds it to the fp16 tolerance
            (:data:`~packrunner.convert._precision.FP16_TOLERANCE`).

    Returns:
        The converted model, already validated with ``onnx.checker.check_model(full_check=True)``
        and ``onnx.shape_inference.infer_shapes(strict_mode=True)``; its value_info holds the
        inferred static shapes. It has passed the self-check (:mod:`._selfcheck`: packed
        outputs equal the original's on each sample alone); its metadata ``packrunner.explain``
        says what was matched, what was rewritten and what the self-check measured.

    Raises:
        ConversionError: The graph lacks an input, the position-embedding lookup or the
            attention mask subgraph, the result fails validation, or the self-check finds the
            converted graph's outputs differ from the original's. The message names what.
        ValueError: An argument is out of range.
    """
    form = InputForm.parse(form)
    precision = Precision.parse(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_valid_num < 1:
        raise ValueError(f"max_valid_num must be >= 1, got {max_valid_num}")
    if form is InputForm.UNPACK_REPACK and keep_row_outputs:
        raise ValueError("keep_row_outputs cannot be combined with form='unpack_repack'")

    proto = _load(model)
    try:
        opset = default_opset(proto)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    if opset < 11:
        raise ConversionError(f"opset {opset} is too old; need ai.onnx opset >= 11")
    original = onnx.ModelProto()
    original.CopyFrom(proto)
    upgraded_from = None
    if form is InputForm.UNPACK_REPACK and opset < _UNPACK_OPSET:
        # PopRT users' exports are opset 11. The self-check below compares against the
        # original, not the upgrade.
        proto, upgraded_from, opset = _upgrade(proto, _UNPACK_OPSET), opset, _UNPACK_OPSET
    found = _convert(
        proto,
        form,
        opset=opset,
        batch_size=batch_size,
        seq_len=seq_len,
        max_valid_num=max_valid_num,
        keep_row_outputs=keep_row_outputs,
        position_offset=position_offset,
    )
    converted = _validate(proto)
    if precision is Precision.FP16:
        converted = _validate(to_float16(converted))
    check = check_equivalence(
        original,
        converted,
        form,
        batch_size=batch_size,
        seq_len=seq_len,
        max_valid_num=max_valid_num,
        lookup=found.lookup,
        vocab_size=found.vocab_size,
        outputs=found.outputs,
        tolerance=precision.tolerance,
    )
    if upgraded_from is not None:
        found.notes.insert(0, f"upgraded: ai.onnx opset {upgraded_from} -> {opset}")
    if precision is Precision.FP16:
        found.notes.append("precision: fp16 weights and activations, int32 inputs, fp32 outputs")
    found.notes.append(
        f"self-check: packed vs each sample alone over lengths {list(check.lengths)}: max abs "
        f"diff {check.max_abs_diff:.3g} <= {check.bound:.3g}"
    )
    props = {p.key: p.value for p in converted.metadata_props}
    props[EXPLAIN_KEY] = "\n".join(found.notes)
    helper.set_model_props(converted, props)
    return converted


def convert_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    seq_len: int = 256,
    form: InputForm | str = InputForm.PACKED,
    keep_row_outputs: bool = False,
    max_valid_num: int = 40,
    position_offset: int | None = None,
    precision: Precision | str = Precision.FP32,
) -> onnx.ModelProto:
    """Convert the model at ``in_path`` and write the result to ``out_path``.

    Args:
        in_path: The exported model.
        out_path: Where to write the converted model (parent directories are created). Models
            over 2 GB are written with their weights in ``<out_path>.data`` beside it.
        batch_size: As :func:`convert_to_packed`.
        seq_len: As :func:`convert_to_packed`.
        form: As :func:`convert_to_packed`.
        keep_row_outputs: As :func:`convert_to_packed`.
        max_valid_num: As :func:`convert_to_packed`.
        position_offset: As :func:`convert_to_packed`.
        precision: As :func:`convert_to_packed`.

    Returns:
        The converted model that was written.

    Raises:
        ConversionError: As :func:`convert_to_packed`.
    """
    converted = convert_to_packed(
        in_path,
        batch_size=batch_size,
        seq_len=seq_len,
        form=form,
        keep_row_outputs=keep_row_outputs,
        max_valid_num=max_valid_num,
        position_offset=position_offset,
        precision=precision,
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


def explain(converted: onnx.ModelProto) -> str:
    """What the converter matched, rewrote and measured for ``converted`` (one line each)."""
    props = {p.key: p.value for p in converted.metadata_props}
    return props.get(EXPLAIN_KEY, "not converted by packrunner convert")


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


def _upgrade(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    try:
        upgraded = version_converter.convert_version(proto, opset)
    except (RuntimeError, onnx.checker.ValidationError) as exc:
        raise ConversionError(f"cannot upgrade the export to ai.onnx opset {opset}: {exc}") from exc
    view = GraphView(upgraded.graph)
    view.toposort()

    def rank_of(shapes: list[str]) -> list[int]:
        # Evaluated on a probe row: shape inference does not reach the attention of every
        # export (it stops at dynamic Reshapes).
        probe = {
            i.name: np.ones((1, 3), helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in upgraded.graph.input
            if view.is_graph_input(i.name)
        }
        return [int(np.size(v)) for v in evaluate(upgraded, view, shapes, probe)]

    unwrap_upgraded_softmax(view, rank_of)
    return upgraded


def _validate(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Check the converted model; return it with inferred (static) value_info."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        return shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as exc:
        raise ConversionError(f"the converted graph failed validation: {exc}") from exc


def _convert(
    proto: onnx.ModelProto,
    form: InputForm,
    *,
    opset: int,
    batch_size: int,
    seq_len: int,
    max_valid_num: int,
    keep_row_outputs: bool,
    position_offset: int | None,
) -> _Found:
    """The one driver: find everything, then edit ``proto`` in place into ``form``."""
    view = GraphView(proto.graph)
    types = TensorTypes(proto)
    # Free the names of the inputs to be added first, so the names the finders return stay valid.
    if not view.is_graph_input("position_ids"):
        free_name(view, "position_ids")
    if form is InputForm.UNPACK_REPACK:
        free_name(view, UNPACK_INFO)

    # Find. Nothing is edited until every pattern the form needs was found.
    inputs = find_inputs(view)
    refuse_fused_ops(view, handled=attention_op_nodes(view))
    # One normalisation first, so the one mask-site finder also matches masked_fill exports.
    where_masks = additive_where_masks(view, opset=opset)
    attention_ops = find_attention_ops(proto, view, types, seq_len=seq_len)
    embeddings = find_embedding_sum(view)
    invariant = find_row_invariant_positions(proto, view, embeddings)
    lookup = find_position_lookup(
        proto,
        view,
        embeddings,
        seq_len=seq_len,
        position_offset=position_offset,
        absent_ok=invariant is not None,
    )
    notes = []
    if lookup is not None:
        notes += [
            f"positions: {lookup.kind.value} lookup {lookup.gather!r} over {lookup.table!r} "
            f"[{lookup.rows}, {embeddings.hidden}]: {lookup.reason}",
            f"rewrote: {lookup.table!r} now reads position_ids"
            + (f" + {lookup.offset}" if lookup.offset else "")
            + " (position_ids: 0..L-1 per sample)",
        ]
    if invariant is not None:
        notes += invariant.notes()
    if where_masks:
        notes.append(f"rewrote: {where_masks} masked_fill masks (Where) as additive masks")
    # A padded model keeps the exported mask; an unpack/repack one needs its sites on the static
    # graph, so a graph without them fails here, before any edit.
    sites = (
        [] if form is InputForm.PADDED else find_mask_sites(view, types, required=not attention_ops)
    )
    if attention_ops and form is InputForm.UNPACK_REPACK:
        raise ConversionError(
            f"cannot unpack/repack attention computed by {attention_ops[0].label} ops yet; "
            "convert with form='packed'"
        )
    bands = find_mask_structure(proto, view, sites, seq_len=seq_len)
    if bands:
        notes.append(
            f"kept: a band of its own (sliding window) in the mask of {len(bands)} of "
            f"{len(sites)} attention layers, added to the new bias"
        )
    kinds = classify_outputs(view, types, inputs)
    poolings = _find_poolings(proto, view, kinds, form, keep_row_outputs, lookup, embeddings, notes)
    dropped = [] if keep_row_outputs else [name for name, kind in kinds.items() if kind == "row"]
    if len(dropped) == len(kinds):
        raise ConversionError(
            f"no per-token output: every output ({dropped}) has no sequence axis; pass "
            "keep_row_outputs=True to convert anyway"
        )

    # Edit: a static [batch_size, seq_len] graph with a position_ids input ...
    ours: set[str] = set()
    if form is InputForm.PACKED:
        ours = use_block_diagonal_bias(view, sites, opset=opset)
        add_mask_structure(view, sites, bands, opset=opset)
        ours |= use_block_diagonal_bias_in_ops(view, attention_ops, opset=opset)
        if sites:
            notes.append(
                f"rewrote: the attention mask added before {len(sites)} Softmax nodes is now "
                "the block-diagonal bias of the segment ids in attention_mask"
            )
        for label in sorted({op.label for op in attention_ops}):
            ops = [op for op in attention_ops if op.label == label]
            combined = sum(op.kept_mask is not None for op in ops)
            notes.append(
                f"rewrote: {len(ops)} {label} ops take the block-diagonal bias of the segment "
                "ids as their additive mask"
                + (f" ({combined} added to a constant mask they had)" if combined else "")
            )
    exposed: list[str] = []
    if poolings and form is InputForm.PACKED:
        ours |= pool_per_segment(
            view, poolings, batch_size=batch_size, seq_len=seq_len, opset=opset
        )
        notes.append(
            f"rewrote: {len(poolings)} pooling(s) per segment; {_head_outputs(poolings)} are "
            f"[batch_size, {seq_len} segments, ...] (segment k = the tokens of segment id k + 1)"
        )
    elif poolings:
        exposed = expose_hidden(view, poolings, batch_size=batch_size, seq_len=seq_len)
    if lookup is not None:
        ours |= expose_position_ids(view, lookup, opset=opset)
    else:  # the runner feeds positions to every packed model; these need none
        view.graph.input.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT32, [None, None])
        )
    rerouted = reroute_shape_reads(view, "attention_mask", "input_ids")
    if rerouted:
        notes.append(f"rewrote: {rerouted} shape-only reads of attention_mask read input_ids")
    if dropped:
        logger.warning(
            "dropping per-row outputs %s: in a packed row they describe only its first sample",
            dropped,
        )
        drop_outputs(view, dropped)
        notes.append(f"dropped per-row outputs {dropped}")
    view.toposort()  # prune() sweeps in topological order
    view.prune()
    if form is InputForm.PACKED:
        binary = binary_mask_reads(view, ours, opset=opset)
        if binary:
            notes.append("rewrote: token-wise reads of attention_mask read segment ids > 0")
        ours |= binary
        require_mask_replaced(view, ours, "; those uses would read segment ids as a 0/1 mask")
    retype_inputs(view, batch_size=batch_size, seq_len=seq_len, ours=ours)
    set_static_output_shapes(proto, types, inputs, batch_size=batch_size, seq_len=seq_len)
    # Stale intermediate shapes (symbolic, or of removed tensors) would only get in the way of
    # inference on the static graph; the returned model gets fresh ones.
    del proto.graph.value_info[:]
    view.toposort()
    description = f"batch_size={batch_size};seq_len={seq_len};form={form}"

    # ... whose attention an unpack/repack model then runs per sample slot, around the static
    # shapes strict inference gives every tensor.
    if form is InputForm.UNPACK_REPACK:
        static = _validate(proto).graph
        shapes = {
            value.name: [int(d) for d in found if isinstance(d, int)]
            for value in [*static.value_info, *static.input, *static.output]
            if (found := dims(value)) is not None and all(isinstance(d, int) for d in found)
        }
        cores = find_attention_cores(
            view,
            sites,
            shapes,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
        )
        unpack_attention(
            view,
            cores,
            shapes,
            batch_size=batch_size,
            seq_len=seq_len,
            max_valid_num=max_valid_num,
            opset=opset,
            per_sample=_head_outputs(poolings),
        )
        add_mask_structure(view, sites, bands, opset=opset)
        if poolings:
            pool_per_slot(view, poolings, exposed, max_valid_num=max_valid_num, opset=opset)
            notes.append(
                f"rewrote: {len(poolings)} pooling(s) per sample slot; {_head_outputs(poolings)} "
                f"are [max_valid_num={max_valid_num}, ...]"
            )
        view.toposort()
        view.prune()
        # The stream carries no attention_mask: once the old mask subgraph is gone, nothing may
        # still read it.
        require_mask_replaced(view, set(), "")
        kept_inputs = [i for i in proto.graph.input if i.name != "attention_mask"]
        del proto.graph.input[:]
        proto.graph.input.extend(kept_inputs)
        view.toposort()
        description += f";max_valid_num={max_valid_num}"

        notes.append(f"rewrote: {len(cores)} attention blocks run per sample slot")
    props = {p.key: p.value for p in proto.metadata_props}
    props["packrunner.packed"] = description
    positions = lookup or invariant
    assert positions is not None  # find_position_lookup raised otherwise
    props["packrunner.positions"] = f"kind={positions.kind.value};offset={positions.offset}"
    kept = {name: kind for name, kind in kinds.items() if name not in dropped}
    props[LAYOUTS_METADATA_KEY] = format_output_layouts(
        {name: output_layout(kind, form) for name, kind in kept.items()}
    )
    helper.set_model_props(proto, props)
    return _Found(positions, embeddings.vocab_size, kept, notes)


def _find_poolings(
    proto: onnx.ModelProto,
    view: GraphView,
    kinds: dict[str, OutputKind],
    form: InputForm,
    keep_row_outputs: bool,
    lookup: PositionLookup | None,
    embeddings: EmbeddingSum,
    notes: list[str],
) -> list[Pooling]:
    """The poolings of the per-row outputs a packed form rewrites; their kinds become "sample".

    Per-row outputs stay per row when asked to (``keep_row_outputs``) or in the padded form (one
    sample per row). An output whose pooling is not found is dropped like before, or, when no
    output would be left, refused with the reason.
    """
    rows = [name for name, kind in kinds.items() if kind == "row"]
    if not rows or keep_row_outputs or form is InputForm.PADDED:
        return []
    try:
        poolings = find_pooling(
            proto,
            view,
            rows,
            vocab_size=embeddings.vocab_size,
            pad_token=lookup.pad_token if lookup else None,
        )
    except ConversionError as exc:
        if len(rows) == len(kinds):
            raise ConversionError(f"no per-token output, and {exc}") from exc
        notes.append(f"not rewritten per segment: {exc}")
        return []
    for pooling in poolings:
        notes.append(pooling.describe())
        kinds.update(dict.fromkeys(pooling.outputs, "sample"))
    return poolings


def _head_outputs(poolings: list[Pooling]) -> list[str]:
    return [name for pooling in poolings for name in pooling.outputs]


@dataclass(frozen=True, slots=True)
class _Found:
    """What the driver matched, for the self-check and ``--explain``."""

    lookup: PositionLookup | RowInvariantPositions
    vocab_size: int
    outputs: dict[str, OutputKind]
    notes: list[str]
