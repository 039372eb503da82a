"""Small models, samples and a padded reference shared by the compat tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from tests._support import make_sample as make_token_sample

# A tiny static shape keeps every batch in the millisecond range.
BATCH_SIZE = 2
SEQ_LEN = 16
MAX_VALID_NUM = 6
OUTPUTS = ("start_logits", "end_logits")

TOLERANCE = 1e-5
"""Packed vs padded fp32 logits (the model tests measure ~1e-6)."""


@dataclass
class Sample:
    """The fields of Graphcore's ``BertInputs`` that ``pack_data`` reads."""

    input_ids: npt.NDArray[np.int32]
    attention_mask: npt.NDArray[np.int32]
    token_type_ids: npt.NDArray[np.int32]
    position_ids: npt.NDArray[np.int32]
    input_len: int

    def feeds(self) -> dict[str, npt.NDArray[np.int32]]:
        """The PopRT user's feed dict for this sample."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
            "position_ids": self.position_ids,
        }


def make_sample(rng: np.random.Generator, length: int) -> Sample:
    tokens = make_token_sample(rng, length)
    return Sample(
        input_ids=tokens["input_ids"],
        attention_mask=np.ones(length, dtype=np.int32),
        token_type_ids=tokens["token_type_ids"],
        position_ids=np.arange(length, dtype=np.int32),
        input_len=length,
    )


def make_samples(lengths: list[int], seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [make_sample(rng, length) for length in lengths]


class PaddedReference:
    """Per-sample logits from the padded model, one sample per row: the ground truth."""

    def __init__(self, padded_model: Path) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(padded_model), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, sample: Sample) -> dict[str, npt.NDArray[Any]]:
        length = sample.input_len
        feeds = {
            name: np.zeros((BATCH_SIZE, SEQ_LEN), dtype=np.int32)
            for name in ("input_ids", "token_type_ids", "attention_mask")
        }
        feeds["input_ids"][0, :length] = sample.input_ids
        feeds["token_type_ids"][0, :length] = sample.token_type_ids
        feeds["attention_mask"][0, :length] = 1
        values = self._session.run(list(OUTPUTS), feeds)
        return {name: value[0, :length] for name, value in zip(OUTPUTS, values, strict=True)}
