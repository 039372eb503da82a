"""The dynamic-axes build computes exactly what the fixed build computes, at every shape.

One dynamic model per (form, head) is run at several ``[rows, width]`` shapes and compared with
the fixed-shape model built for that very shape, on the same feeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from packrunner import InputForm
from packrunner.models import (
    DEFAULT_CONFIG,
    HEADS,
    BertWeights,
    Head,
    build_bert_onnx,
    output_names,
)
from tests._support import Feeds, pack_first_fit, pack_padded, token_samples

from ._support import OrtModel, max_abs_diff, record_max_diff

DYNAMIC_TOLERANCE = 1e-6
SHAPES = [(1, 8), (4, 32), (16, 64), (3, 256)]
FORMS = [InputForm.PACKED, InputForm.PADDED]


def _feeds(form: InputForm, rows: int, width: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    if form is InputForm.PADDED:
        lengths = rng.integers(1, width + 1, size=rows)
        samples = token_samples(rng, lengths.tolist(), DEFAULT_CONFIG.vocab_size, pairs=True)
        return pack_padded(samples, rows, width)
    lengths = rng.integers(1, max(width // 3, 1) + 1, size=rows * 2)
    samples = token_samples(rng, lengths.tolist(), DEFAULT_CONFIG.vocab_size, pairs=True)
    feeds, _ = pack_first_fit(samples, rows, width)
    return feeds


def _build(weights: BertWeights, form: InputForm, head: Head, **shape: Any) -> onnx.ModelProto:
    return build_bert_onnx(DEFAULT_CONFIG, weights, form=form, head=head, **shape)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("form", FORMS)
def test_dynamic_equals_fixed_at_every_shape(
    default_weights: BertWeights, form: InputForm, head: Head
) -> None:
    dynamic = OrtModel(_build(default_weights, form, head, seq_len=256, dynamic=True))
    for seed, (rows, width) in enumerate(SHAPES):
        fixed = OrtModel(_build(default_weights, form, head, batch_size=rows, seq_len=width))
        feeds = _feeds(form, rows, width, seed)
        got, expected = dynamic(feeds), fixed(feeds)
        for name in output_names(head):
            assert got[name].shape == expected[name].shape, (name, rows, width)
            diff = max_abs_diff(got[name], expected[name])
            record_max_diff(f"dynamic vs fixed build {form}/{head}/{name}", diff)
            assert diff <= DYNAMIC_TOLERANCE, (name, rows, width, diff)


def test_dynamic_check_bites(default_weights: BertWeights) -> None:
    """Negative control: the comparison sees a one-token change in one row."""
    dynamic = OrtModel(_build(default_weights, InputForm.PACKED, "qa", seq_len=256, dynamic=True))
    feeds = _feeds(InputForm.PACKED, 4, 32, 0)
    changed: dict[str, npt.NDArray[Any]] = {k: v.copy() for k, v in feeds.items()}
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % DEFAULT_CONFIG.vocab_size
    assert max_abs_diff(dynamic(feeds)["start_logits"], dynamic(changed)["start_logits"]) > 1e-3


def test_dynamic_inputs_are_symbolic(default_weights: BertWeights) -> None:
    model = _build(default_weights, InputForm.PADDED, "encoder", seq_len=64, dynamic=True)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", value.name
        if value.name != "sentence_embedding":
            assert dims[1].dim_param == "seq", value.name


def test_dynamic_unpack_repack_refused(default_weights: BertWeights) -> None:
    with pytest.raises(ValueError, match="packed and padded"):
        _build(default_weights, InputForm.UNPACK_REPACK, "qa", dynamic=True)
