"""SimulatedDevice: a stand-in for a static-shape accelerator, and its single-sample reference.

It behaves like a compiled graph where it matters for the runner:

* it accepts exactly its compiled shapes and dtypes and raises on anything else;
* it takes ``batch_latency_us`` per batch whatever the contents, sleeping (not spinning) so the
  host CPU stays free for the runner, as it would with a real accelerator; given a
  :class:`~packrunner.ShapeSet` it runs several shapes (buckets or dynamic axes), each taking
  the time its latency model (:class:`~packrunner.cost.BatchCost`) says;
* its ``start_logits`` / ``end_logits`` for a token depend on that token, its position, its
  token type AND every other token of its own segment (an exact integer digest of the segment),
  never on other segments or padding. Any cross-contamination between packed samples, a wrong
  position id or a misplaced unpack changes the numbers, and :func:`simulated_reference` gives
  the exact outputs of one sample run alone, so equivalence checks can be bit-exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from packrunner.config import InputForm
from packrunner.cost import BatchCost
from packrunner.devices.base import Device, OutputLayout, OutputSpec, ShapeSet, TensorSpec

__all__ = [
    "ORT_DEFAULT_MODEL_COST",
    "POPRT_IPU_BATCH_LATENCY_US",
    "SimulatedDevice",
    "simulated_reference",
]

#: PopRT's IPU runs 16 padded bert-base samples at 1861 samples/s: 8.6 ms per batch.
POPRT_IPU_BATCH_LATENCY_US = 8_600

#: Batch time of the default model (packed form, dynamic axes) under onnxruntime CPU, 2 intra-op
#: threads: seconds = c0 + c1 * rows * width + c2 * rows * width**2. The ratios come from a
#: least-squares fit to the fastest of 14 interleaved runs of 12 shapes from [1, 256] to
#: [128, 32] (c0 5.18e-3, c1 1.54e-4, c2 2.37e-7 s on the shared, loaded 2-core build host,
#: where [16, 256] took 884 ms); the scale makes [16, 256] take 26.4 ms, the packed batch time
#: measured on the quiet host (docs/benchmarks.md). Attention is then 28% of a 256-wide batch
#: and 5% of a 32-wide one: [64, 64] takes 20.8 ms, [128, 32] 19.9 ms.
ORT_DEFAULT_MODEL_COST = BatchCost(fixed_s=1.55e-4, per_token_s=4.60e-6, per_token_width_s=7.07e-9)

OUTPUT_NAMES = ("start_logits", "end_logits")


def _token_terms(
    input_ids: npt.NDArray[np.int64],
    token_type_ids: npt.NDArray[np.int64],
    position_ids: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    # Integer per-token contribution to the segment digest (exact in float64 sums: < 2**53).
    contribution = (input_ids * 31 + token_type_ids * 7 + position_ids * 3 + 1) % 100_003
    local = (input_ids % 977) * 0.013 + position_ids * 0.021 + token_type_ids * 0.5
    return contribution, local


def _logits(
    local: npt.NDArray[np.float64], digest: npt.NDArray[np.float64], count: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    context = (digest % 10_007) / 10_007.0 + count * 0.001
    start = np.sin(local + 3.0 * context).astype(np.float32)
    end = np.cos(0.7 * local - 2.0 * context).astype(np.float32)
    return start, end


def simulated_reference(
    input_ids: npt.ArrayLike,
    token_type_ids: npt.ArrayLike | None = None,
    position_ids: npt.ArrayLike | None = None,
) -> dict[str, npt.NDArray[np.float32]]:
    """Outputs of :class:`SimulatedDevice` for one sample run alone (its own segment).

    Args:
        input_ids: The sample's token ids, 1-D.
        token_type_ids: Defaults to zeros.
        position_ids: Defaults to ``0..L-1``.

    Returns:
        ``start_logits`` and ``end_logits``, each float32 of the sample's length.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
    positions = (
        np.arange(len(ids), dtype=np.int64)
        if position_ids is None
        else np.asarray(position_ids, dtype=np.int64)
    )
    contribution, local = _token_terms(ids, types, positions)
    digest = np.full(len(ids), float(contribution.sum()))
    count = np.full(len(ids), float(len(ids)))
    start, end = _logits(local, digest, count)
    return {"start_logits": start, "end_logits": end}


class SimulatedDevice(Device):
    """A deterministic fixed-shape "accelerator" for tests and benchmarks.

    Args:
        batch_size: Compiled rows.
        seq_len: Compiled tokens per row.
        batch_latency_us: Wall time one batch takes (default: PopRT's IPU, 8.6 ms).
        form: The :class:`~packrunner.InputForm` it is compiled for. ``PACKED`` (default):
            inputs ``input_ids``, ``token_type_ids``, ``position_ids`` and ``attention_mask``
            with segment ids, outputs ``[batch_size, seq_len]``. ``PADDED``: no
            ``position_ids`` (every row starts at position 0), a 0/1 ``attention_mask``.
            ``UNPACK_REPACK``: ``attention_mask`` replaced by ``unpack_info``
            ``[max_valid_num]``; samples may cross rows; outputs ``[max_valid_num, seq_len]``.
        max_valid_num: Length of ``unpack_info`` in the ``UNPACK_REPACK`` form.
        shapes: The shapes it runs (packed and padded forms): default, only
            ``[batch_size, seq_len]``, which must be one of them and as wide as the widest.
        latency: Time per batch shape when ``shapes`` has several: default
            :data:`ORT_DEFAULT_MODEL_COST`, the default model under onnxruntime on CPU (how
            it was measured is stated there). A single-shape device takes
            ``batch_latency_us`` instead.

    Example:
        >>> device = SimulatedDevice(batch_latency_us=0)
        >>> sorted(device.input_specs)
        ['attention_mask', 'input_ids', 'position_ids', 'token_type_ids']
    """

    def __init__(
        self,
        *,
        batch_size: int = 16,
        seq_len: int = 256,
        batch_latency_us: int = POPRT_IPU_BATCH_LATENCY_US,
        form: InputForm | str = InputForm.PACKED,
        max_valid_num: int = 40,
        shapes: ShapeSet | None = None,
        latency: BatchCost | None = None,
    ) -> None:
        form = InputForm.parse(form)
        if batch_latency_us < 0:
            raise ValueError(f"batch_latency_us must be >= 0, got {batch_latency_us}")
        self._shapes = shapes if shapes is not None else ShapeSet.fixed(batch_size, seq_len)
        if (batch_size, seq_len) not in self._shapes or self._shapes.max_width != seq_len:
            raise ValueError(
                f"[batch_size, seq_len] = [{batch_size}, {seq_len}] must be one of the shapes, "
                f"as wide as the widest: {self._shapes}"
            )
        if not self._shapes.is_single and form is InputForm.UNPACK_REPACK:
            raise ValueError("an unpack_repack device has one fixed stream shape")
        self.latency = latency if latency is not None else ORT_DEFAULT_MODEL_COST
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.batch_latency_us = batch_latency_us
        self.form = form
        self.max_valid_num = max_valid_num
        shape = (batch_size, seq_len)
        int32 = np.dtype(np.int32)
        names = ["input_ids", "token_type_ids"]
        if form is not InputForm.PADDED:
            names.append("position_ids")
        specs = {name: TensorSpec(name, shape, int32) for name in names}
        if form is InputForm.UNPACK_REPACK:
            specs["unpack_info"] = TensorSpec("unpack_info", (max_valid_num,), int32)
            layout = OutputLayout.SAMPLE_TOKENS
        else:
            specs["attention_mask"] = TensorSpec("attention_mask", shape, int32)
            layout = OutputLayout.PACKED_TOKENS
        self._input_specs = specs
        self._output_specs = {name: OutputSpec(name, layout) for name in OUTPUT_NAMES}
        self.batches_run = 0
        # time.sleep() wakes late by a fairly steady amount (timer slack, scheduling, the GIL);
        # sleeping that much less keeps the simulated batch latency at batch_latency_us.
        self._sleep_overshoot_s = 0.0

    def replica(self) -> SimulatedDevice:
        """A fresh SimulatedDevice with the same shapes, form and latency."""
        return SimulatedDevice(
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            batch_latency_us=self.batch_latency_us,
            form=self.form,
            max_valid_num=self.max_valid_num,
            shapes=self._shapes,
            latency=self.latency,
        )

    @property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """The compiled inputs."""
        return self._input_specs

    @property
    def output_specs(self) -> Mapping[str, OutputSpec]:
        """``start_logits`` and ``end_logits``."""
        return self._output_specs

    @property
    def shapes(self) -> ShapeSet:
        """The shapes it runs."""
        return self._shapes

    def batch_latency_s(self, shape: tuple[int, int]) -> float:
        """Wall time of one batch of ``shape``."""
        if self._shapes.is_single:
            return self.batch_latency_us * 1e-6
        return self.latency(shape)

    def run(
        self, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch; raises ``ValueError`` on feeds that do not match the compiled specs."""
        started = time.perf_counter()
        shape = self._check_feeds(feeds)
        ids = feeds["input_ids"].astype(np.int64)
        types = feeds["token_type_ids"].astype(np.int64)
        if self.form is InputForm.PADDED:
            positions = np.broadcast_to(np.arange(shape[1], dtype=np.int64), ids.shape)
            if feeds["attention_mask"].max() > 1:
                raise ValueError("attention_mask of a padded model is a 0/1 mask")
        else:
            positions = feeds["position_ids"].astype(np.int64)
        contribution, local = _token_terms(ids, types, positions)
        if self.form is InputForm.UNPACK_REPACK:
            outputs = self._run_stream(feeds["unpack_info"], contribution, local)
        else:
            outputs = self._run_segments(feeds["attention_mask"], contribution, local)
        self.batches_run += 1
        remaining = self.batch_latency_s(shape) - (time.perf_counter() - started)
        if remaining > 0:
            asked = max(0.0, remaining - self._sleep_overshoot_s)
            before = time.perf_counter()
            time.sleep(asked)
            late = (time.perf_counter() - before) - asked
            self._sleep_overshoot_s += 0.2 * (min(late, remaining) - self._sleep_overshoot_s)
        return outputs

    def _check_feeds(self, feeds: Mapping[str, npt.NDArray[np.generic]]) -> tuple[int, int]:
        """Check the feeds against the specs; return the batch's ``(rows, width)``."""
        if set(feeds) != set(self._input_specs):
            raise ValueError(
                f"static graph expects inputs {sorted(self._input_specs)}, got {sorted(feeds)}"
            )
        batch_shape = (self.batch_size, self.seq_len)
        if not self._shapes.is_single:
            batch_shape = getattr(feeds["input_ids"], "shape", batch_shape)
            if batch_shape not in self._shapes:
                raise ValueError(f"batch shape {batch_shape} is not one of {self._shapes}")
        for name, spec in self._input_specs.items():
            array = feeds[name]
            expected = batch_shape if len(spec.shape) == 2 else spec.shape
            if not isinstance(array, np.ndarray) or array.shape != expected:
                shape = getattr(array, "shape", None)
                raise ValueError(f"input {name!r}: compiled shape {expected}, got {shape}")
            if array.dtype != spec.dtype:
                raise ValueError(f"input {name!r}: compiled dtype {spec.dtype}, got {array.dtype}")
        return batch_shape[0], batch_shape[1]

    def _run_segments(
        self,
        mask: npt.NDArray[np.generic],
        contribution: npt.NDArray[np.int64],
        local: npt.NDArray[np.float64],
    ) -> dict[str, npt.NDArray[np.generic]]:
        segment = mask.astype(np.int64)
        rows, width = segment.shape
        if segment.min() < 0 or segment.max() > width:
            raise ValueError("attention_mask holds segment ids 0..seq_len")
        # One group per (row, segment id); padding (id 0) gets its own ignored groups.
        group = (np.arange(rows)[:, None] * (width + 1) + segment).reshape(-1)
        size = rows * (width + 1)
        digest = np.bincount(group, weights=contribution.reshape(-1), minlength=size)[group]
        count = np.bincount(group, minlength=size).astype(np.float64)[group]
        start, end = _logits(local.reshape(-1), digest, count)
        valid = segment.reshape(-1) > 0
        start[~valid] = 0.0
        end[~valid] = 0.0
        return {"start_logits": start.reshape(rows, width), "end_logits": end.reshape(rows, width)}

    def _run_stream(
        self,
        unpack_info: npt.NDArray[np.generic],
        contribution: npt.NDArray[np.int64],
        local: npt.NDArray[np.float64],
    ) -> dict[str, npt.NDArray[np.generic]]:
        lengths = unpack_info.astype(np.int64)
        if lengths.min() < 0 or lengths.max() > self.seq_len:
            raise ValueError(f"unpack_info lengths must be in 0..{self.seq_len}")
        if lengths.sum() > self.batch_size * self.seq_len:
            raise ValueError("unpack_info lengths exceed the token stream")
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # Unpack: slot k takes stream[starts[k] : starts[k] + lengths[k]].
        column = np.arange(self.seq_len)
        valid = column[None, :] < lengths[:, None]
        index = np.where(valid, starts[:, None] + column[None, :], 0)
        slot_contribution = np.where(valid, contribution.reshape(-1)[index], 0)
        slot_local = local.reshape(-1)[index]
        digest = np.broadcast_to(
            slot_contribution.sum(axis=1, dtype=np.float64)[:, None], valid.shape
        )
        count = np.broadcast_to(lengths.astype(np.float64)[:, None], valid.shape)
        start, end = _logits(slot_local, digest, count)
        start[~valid] = 0.0
        end[~valid] = 0.0
        return {"start_logits": start, "end_logits": end}
