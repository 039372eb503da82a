"""Packed and unpack/repack graphs must equal, per sample, the padded graph and numpy reference.

Every comparison is on the default model (``DEFAULT_CONFIG``, random weights, ``[16, 256]``,
``max_valid_num=40``) with hand-built layouts covering: full rows, length-1 samples, a row using
all 40 segment ids, all-padding rows, samples crossing row boundaries in the stream, and unused
(zero-length) slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from packrunner import InputForm
from packrunner.models import (
    DEFAULT_CONFIG,
    HEADS,
    BertWeights,
    Head,
    build_bert_onnx,
    input_names,
    output_names,
    random_bert_weights,
    reference_forward,
)
from tests._support import (
    Feeds,
    Placement,
    Sample,
    pack_padded,
    pack_rows,
    pack_stream,
    token_samples,
)

from ._support import TOLERANCE, OrtModel, max_abs_diff, record_max_diff

B, S, M = 16, 256, 40
H = DEFAULT_CONFIG.hidden_size
ModelFactory = Callable[[InputForm, Head], OrtModel]
Outputs = dict[str, npt.NDArray[Any]]
PerSample = list[dict[str, npt.NDArray[Any]]]


@dataclass(frozen=True)
class PackedCase:
    rows: list[list[Sample]]
    samples: list[Sample]  # row-major order, matching placements
    feeds: Feeds
    placements: list[Placement]
    references: PerSample


@dataclass(frozen=True)
class StreamCase:
    samples: list[Sample]  # slot order; empty samples are zero-length slots
    feeds: Feeds
    starts: list[int]
    references: PerSample  # empty dict for zero-length slots


def _references(weights: BertWeights, samples: Sequence[Sample]) -> PerSample:
    return [
        reference_forward(DEFAULT_CONFIG, weights, s.input_ids, s.token_type_ids)
        if s.length
        else {}
        for s in samples
    ]


def _row_lengths(rng: np.random.Generator) -> list[list[int]]:
    rows: list[list[int]] = [
        [256],  # a full row, one sample
        [1, 255],
        [128, 127, 1],
        [100, 64, 50, 17, 3, 2],
        [int(n) for n in rng.integers(1, 7, size=M)],  # uses every segment id 1..40
        [200],  # one sample, then padding
        [],  # an all-padding row between used rows
    ]
    while len(rows) < 13:
        row: list[int] = []
        free = S
        while free > 0:
            # Mix short and long samples so rows hold 1..many segments.
            length = int(rng.integers(1, 33) if rng.random() < 0.6 else rng.integers(1, S + 1))
            if length > free:
                break
            row.append(length)
            free -= length
        rows.append(row)
    return rows + [[], [], []]  # trailing all-padding rows


@pytest.fixture(scope="module")
def packed_case(default_weights: BertWeights) -> PackedCase:
    rng = np.random.default_rng(1234)
    rows = [
        token_samples(rng, lengths, DEFAULT_CONFIG.vocab_size, pairs=True)
        for lengths in _row_lengths(rng)
    ]
    feeds, placements = pack_rows(rows, B, S)
    samples = [sample for row in rows for sample in row]
    return PackedCase(rows, samples, feeds, placements, _references(default_weights, samples))


def _stream_lengths(kind: str, rng: np.random.Generator) -> list[int]:
    if kind == "trailing_empty_slots":
        # Starts at 5 so the full-length sample straddles rows 0 and 1; 6 slots stay unused.
        lengths = [5, 256, 1, 255, 130, 77, 256, 3]
        while len(lengths) < M - 6:
            lengths.append(int(rng.integers(1, 65) if rng.random() < 0.6 else rng.integers(1, S)))
        assert sum(lengths) <= B * S
        return lengths
    if kind == "empty_slots_inside":
        return [10, 0, 20, 0, 0, 256, 1, 0, 199, 37]
    if kind == "full_stream":
        # Exactly B * S tokens in all 40 slots: no stream padding at all.
        while True:
            lengths = [int(n) for n in rng.integers(60, 140, size=M - 1)]
            last = B * S - sum(lengths)
            if 1 <= last <= S:
                return [*lengths, last]
    raise AssertionError(kind)


STREAM_KINDS = ("trailing_empty_slots", "empty_slots_inside", "full_stream")


@pytest.fixture(scope="module", params=STREAM_KINDS)
def stream_case(request: pytest.FixtureRequest, default_weights: BertWeights) -> StreamCase:
    rng = np.random.default_rng(99)
    lengths = _stream_lengths(request.param, rng)
    samples = token_samples(rng, lengths, DEFAULT_CONFIG.vocab_size, pairs=True)
    feeds, starts = pack_stream(samples, B, S, M)
    return StreamCase(samples, feeds, starts, _references(default_weights, samples))


# --- Per-sample extraction from each layout. -------------------------------------------------


def _from_packed(out: Outputs, head: Head, placement: Placement, length: int) -> Outputs:
    r, start = placement.row, placement.offset
    if head == "qa":
        return {name: out[name][r, start : start + length] for name in output_names(head)}
    return {
        "last_hidden_state": out["last_hidden_state"][r, start : start + length],
        "sentence_embedding": out["sentence_embedding"][r, placement.segment - 1],
    }


def _from_slot(out: Outputs, head: Head, slot: int, length: int) -> Outputs:
    """Padded graph (slot = row) and unpack_repack graph (slot = sample index) share a layout."""
    if head == "qa":
        return {name: out[name][slot, :length] for name in output_names(head)}
    return {
        "last_hidden_state": out["last_hidden_state"][slot, :length],
        "sentence_embedding": out["sentence_embedding"][slot],
    }


def _run_padded(model: OrtModel, head: Head, samples: Sequence[Sample]) -> PerSample:
    """Each sample alone in its own row of the padded twin, 16 samples per batch."""
    results: PerSample = []
    for first in range(0, len(samples), B):
        chunk = samples[first : first + B]
        out = model(pack_padded(chunk, B, S))
        _assert_finite(out)
        results.extend(_from_slot(out, head, i, s.length) for i, s in enumerate(chunk))
    return results


def _compare(label: str, got: PerSample, expected: PerSample, head: Head) -> None:
    assert len(got) == len(expected)
    for name in output_names(head):
        diff = max(max_abs_diff(g[name], e[name]) for g, e in zip(got, expected, strict=True))
        record_max_diff(f"{label} {name}", diff)
        assert diff <= TOLERANCE, f"{label} {name}: max abs diff {diff:.3e}"


def _assert_finite(out: Outputs) -> None:
    for name, value in out.items():
        assert np.isfinite(value).all(), f"{name} has NaN/inf"


# --- Tests. -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_padded_matches_reference(
    head: Head, packed_case: PackedCase, default_model: ModelFactory
) -> None:
    padded = _run_padded(default_model(InputForm.PADDED, head), head, packed_case.samples)
    _compare(f"padded/{head} vs reference", padded, packed_case.references, head)


@pytest.mark.parametrize("head", HEADS)
def test_packed_matches_padded_and_reference(
    head: Head, packed_case: PackedCase, default_model: ModelFactory
) -> None:
    out = default_model(InputForm.PACKED, head)(packed_case.feeds)
    _assert_finite(out)
    got = [
        _from_packed(out, head, p, s.length)
        for p, s in zip(packed_case.placements, packed_case.samples, strict=True)
    ]
    padded = _run_padded(default_model(InputForm.PADDED, head), head, packed_case.samples)
    _compare(f"packed/{head} vs padded", got, padded, head)
    _compare(f"packed/{head} vs reference", got, packed_case.references, head)


def test_packed_sentence_embedding_zero_for_absent_segments(
    packed_case: PackedCase, default_model: ModelFactory
) -> None:
    pooled = default_model(InputForm.PACKED, "encoder")(packed_case.feeds)["sentence_embedding"]
    assert pooled.shape == (B, M, H)
    for r in range(B):
        used = len(packed_case.rows[r]) if r < len(packed_case.rows) else 0
        assert np.all(pooled[r, used:] == 0.0), f"row {r}: absent segments must pool to 0"
        assert np.all(np.any(pooled[r, :used] != 0.0, axis=-1))


@pytest.mark.parametrize("head", HEADS)
def test_packed_negative_control_plain_mask_differs(
    head: Head, packed_case: PackedCase, default_model: ModelFactory
) -> None:
    """Without the block-diagonal mask samples attend to their row-mates: results must change.

    Proves the equality checks above can fail: if the graph ignored the segment ids, this
    plain-0/1-mask run would match them.
    """
    model = default_model(InputForm.PACKED, head)
    plain = dict(packed_case.feeds)
    plain["attention_mask"] = (plain["attention_mask"] > 0).astype(np.int32)
    leaky = model(plain)
    good = model(packed_case.feeds)
    row_diffs: dict[int, float] = {}
    for placement, sample in zip(packed_case.placements, packed_case.samples, strict=True):
        if len(packed_case.rows[placement.row]) < 2:
            continue  # alone in its row: nothing to leak from
        got = _from_packed(leaky, head, placement, sample.length)
        ref = _from_packed(good, head, placement, sample.length)
        diff = max(max_abs_diff(got[n], ref[n]) for n in output_names(head))
        row_diffs[placement.row] = max(diff, row_diffs.get(placement.row, 0.0))
    assert len(row_diffs) >= 5
    weakest = min(row_diffs.values())
    record_max_diff(f"negative control packed/{head} (weakest multi-sample row)", weakest)
    # Every row holding several samples must be visibly contaminated, not just some.
    assert weakest > 1e-2, row_diffs


@pytest.mark.parametrize("head", HEADS)
def test_unpack_repack_matches_padded_and_reference(
    head: Head, stream_case: StreamCase, default_model: ModelFactory
) -> None:
    out = default_model(InputForm.UNPACK_REPACK, head)(stream_case.feeds)
    _assert_finite(out)
    used = [k for k, s in enumerate(stream_case.samples) if s.length]
    assert any(
        stream_case.starts[k] // S
        != (stream_case.starts[k] + stream_case.samples[k].length - 1) // S
        for k in used
    ), "the layout must put at least one sample across a row boundary"
    samples = [stream_case.samples[k] for k in used]
    got = [_from_slot(out, head, k, stream_case.samples[k].length) for k in used]
    padded = _run_padded(default_model(InputForm.PADDED, head), head, samples)
    _compare(f"unpack_repack/{head} vs padded", got, padded, head)
    _compare(
        f"unpack_repack/{head} vs reference", got, [stream_case.references[k] for k in used], head
    )

    # Past each sample's length, and in unused slots, outputs are exactly zero.
    lengths = stream_case.feeds["unpack_info"]
    for k in range(M):
        for name in output_names(head):
            if name == "sentence_embedding":
                if lengths[k] == 0:
                    assert np.all(out[name][k] == 0.0)
            else:
                assert np.all(out[name][k, lengths[k] :] == 0.0), (name, k)


@pytest.mark.parametrize("head", HEADS)
def test_unpack_repack_negative_control_merged_samples_differ(
    head: Head, default_model: ModelFactory
) -> None:
    """Merging two neighbouring samples into one slot must change the first one's outputs.

    The unpack_repack-vs-padded comparison comes out bit-identical (both run each sample alone at
    position 0), so this proves the per-sample length mask really separates stream neighbours.
    """
    rng = np.random.default_rng(7)
    samples = token_samples(rng, [30, 100, 126, 5], DEFAULT_CONFIG.vocab_size, pairs=True)
    feeds, _ = pack_stream(samples, B, S, M)
    merged = dict(feeds)
    merged["unpack_info"] = feeds["unpack_info"].copy()
    merged["unpack_info"][1:3] = [226, 0]  # slots 1 and 2 read as one 226-token sample
    model = default_model(InputForm.UNPACK_REPACK, head)
    good, leaky = model(feeds), model(merged)
    diff = max(
        max_abs_diff(_from_slot(good, head, 1, 100)[n], _from_slot(leaky, head, 1, 100)[n])
        for n in output_names(head)
    )
    record_max_diff(f"negative control unpack_repack/{head} (merged slots)", diff)
    assert diff > 1e-2
    # The untouched slots are unaffected.
    for slot, length in ((0, 30), (3, 5)):
        for n in output_names(head):
            assert (
                max_abs_diff(
                    _from_slot(good, head, slot, length)[n],
                    _from_slot(leaky, head, slot, length)[n],
                )
                == 0.0
            )


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("form", tuple(InputForm))
def test_all_padding_batch_is_finite(
    form: InputForm, head: Head, default_model: ModelFactory
) -> None:
    """All-padding rows / all slots empty: every query has no allowed key, yet no NaN."""
    model = default_model(form, head)
    feeds = {
        name: np.zeros((M,) if name == "unpack_info" else (B, S), dtype=np.int32)
        for name in input_names(form)
    }
    out = model(feeds)
    _assert_finite(out)
    if form == "unpack_repack":
        for value in out.values():
            assert np.all(value == 0.0)
    if head == "encoder" and form != "unpack_repack":
        assert np.all(out["sentence_embedding"] == 0.0)


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize(("form", "head"), [("packed", "qa"), ("unpack_repack", "encoder")])
def test_other_opsets_give_same_outputs(form: InputForm, head: Head, opset: int) -> None:
    """The graph uses no op whose signature changed after opset 17 in an incompatible way."""
    weights = random_bert_weights(DEFAULT_CONFIG, seed=3)
    rng = np.random.default_rng(5)
    samples = token_samples(rng, [7, 20, 5, 0, 30], DEFAULT_CONFIG.vocab_size, pairs=True)
    if form == "packed":
        feeds, _ = pack_rows([samples[:2], [], [samples[2]], [samples[4]]], 4, 32)
    else:
        feeds, _ = pack_stream(samples, 4, 32, 6)
    outputs = []
    for version in (17, opset):
        model = build_bert_onnx(
            DEFAULT_CONFIG,
            weights,
            form=form,
            head=head,
            batch_size=4,
            seq_len=32,
            max_valid_num=6,
            opset=version,
        )
        assert model.opset_import[0].version == version
        outputs.append(OrtModel(model)(feeds))
    for name in output_names(head):
        assert max_abs_diff(outputs[0][name], outputs[1][name]) == 0.0


@pytest.mark.parametrize("head", HEADS)
def test_unpack_repack_invalid_lengths_stay_in_bounds(head: Head) -> None:
    """Lengths past seq_len or summing past the stream are invalid, but must not crash the run
    (an out-of-range Gather would fail the whole batch) nor produce NaN."""
    model = OrtModel(
        build_bert_onnx(
            DEFAULT_CONFIG,
            random_bert_weights(DEFAULT_CONFIG, seed=0),
            form="unpack_repack",
            head=head,
            batch_size=2,
            seq_len=16,
            max_valid_num=4,
        )
    )
    zeros = np.zeros((2, 16), dtype=np.int32)
    positions = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    for lengths in ([16, 16, 16, 16], [20, 5, 0, 0], [40, 0, 0, 0]):
        feeds = {
            "input_ids": zeros,
            "token_type_ids": zeros,
            "position_ids": positions,
            "unpack_info": np.array(lengths, dtype=np.int32),
        }
        _assert_finite(model(feeds))
