"""The one device factory of ``packrunner compare`` and ``packrunner bench``.

A benchmark needs a fresh device per run, of the model form each packing algorithm feeds:
``padded`` (one sample per row), ``packed`` (segment-id mask, several samples per row) or
``unpack_repack`` (samples across rows), and for the dynamic-shape peers the padded model with
dynamic axes. :class:`DeviceSet` knows where each form comes from:
:class:`~packrunner.devices.simulated.SimulatedDevice` timing, the embedded default BERT, a
Hugging Face checkpoint, or the user's own ONNX files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from packrunner.config import InputForm, PackAlgorithm
from packrunner.devices.base import Device
from packrunner.devices.simulated import POPRT_IPU_BATCH_LATENCY_US, SimulatedDevice
from packrunner.errors import ConfigError

__all__ = ["DeviceSet"]

Backend = Literal["sim", "onnx"]


@dataclass(frozen=True)
class DeviceSet:
    """Makes a fresh device of each model form, all at one batch shape.

    Build one with :meth:`simulated` or :meth:`onnx`. ``paths`` holds the ONNX file of each form
    the set can make (empty for the simulated backend, which makes every form).
    """

    backend: Backend
    batch_size: int
    seq_len: int
    max_valid_num: int
    name: str
    batch_latency_us: int = POPRT_IPU_BATCH_LATENCY_US
    threads: int | None = None
    paths: Mapping[InputForm, Path] = field(default_factory=dict)
    dynamic_padded: Path | None = None
    dynamic_packed: Path | None = None

    @classmethod
    def simulated(
        cls,
        *,
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
        batch_latency_us: int = POPRT_IPU_BATCH_LATENCY_US,
    ) -> DeviceSet:
        """SimulatedDevices taking ``batch_latency_us`` per batch."""
        return cls(
            "sim",
            batch_size,
            seq_len,
            max_valid_num,
            name=f"SimulatedDevice at {batch_latency_us / 1000:.1f} ms/batch",
            batch_latency_us=batch_latency_us,
        )

    @classmethod
    def onnx(
        cls,
        *,
        batch_size: int,
        seq_len: int,
        max_valid_num: int,
        threads: int | None = None,
        model: str | os.PathLike[str] | None = None,
        padded_model: str | os.PathLike[str] | None = None,
        unpack_repack_model: str | os.PathLike[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_name: str | None = None,
    ) -> DeviceSet:
        """onnxruntime sessions on the user's models, a checkpoint's, or the embedded default's.

        ``checkpoint_name`` names a checkpoint in titles (default: its folder's name). With
        ``model`` (a packed-form model), the padded baseline is that same model run one
        sample per row unless ``padded_model`` is given: with one segment per row the
        block-diagonal mask is the padding mask, so this is the model's own padded form. The
        unpack/repack form exists only when ``unpack_repack_model`` is given.

        Raises:
            ConfigError: ``model`` and ``checkpoint`` are both given.
        """
        from packrunner.models.cache import checkpoint_model_path, default_model_path

        if model is not None and checkpoint is not None:
            raise ConfigError("give either a model or a checkpoint, not both")
        paths: dict[InputForm, Path] = {}
        dynamic_padded: Path | None = None
        dynamic_packed: Path | None = None
        if model is not None:
            paths[InputForm.PACKED] = Path(model)
            paths[InputForm.PADDED] = Path(padded_model if padded_model is not None else model)
            if unpack_repack_model is not None:
                paths[InputForm.UNPACK_REPACK] = Path(unpack_repack_model)
            name = Path(model).name
        else:
            for form in InputForm:
                if checkpoint is not None:
                    paths[form] = checkpoint_model_path(
                        checkpoint,
                        form,
                        batch_size=batch_size,
                        seq_len=seq_len,
                        max_valid_num=max_valid_num,
                    )
                else:
                    paths[form] = default_model_path(
                        form, batch_size=batch_size, seq_len=seq_len, max_valid_num=max_valid_num
                    )
            dynamic = {
                form: (
                    checkpoint_model_path(checkpoint, form, seq_len=seq_len, dynamic=True)
                    if checkpoint is not None
                    else default_model_path(form, seq_len=seq_len, dynamic=True)
                )
                for form in (InputForm.PADDED, InputForm.PACKED)
            }
            dynamic_padded, dynamic_packed = dynamic[InputForm.PADDED], dynamic[InputForm.PACKED]
            if padded_model is not None:
                paths[InputForm.PADDED] = Path(padded_model)
            if unpack_repack_model is not None:
                paths[InputForm.UNPACK_REPACK] = Path(unpack_repack_model)
            if checkpoint is None:
                name = "default BERT (2 layers, hidden 128)"
            else:
                name = checkpoint_name or f"checkpoint {Path(checkpoint).name}"
        return cls(
            "onnx",
            batch_size,
            seq_len,
            max_valid_num,
            name=f"onnxruntime CPU ({os.cpu_count()} cores), {name}",
            threads=threads,
            paths=paths,
            dynamic_padded=dynamic_padded,
            dynamic_packed=dynamic_packed,
        )

    def supports(self, algorithm: PackAlgorithm) -> bool:
        """Whether the set has the model form ``algorithm`` feeds."""
        return self.backend == "sim" or InputForm.for_algorithm(algorithm) in self.paths

    def make(self, form: InputForm, *, batch_latency_us: int | None = None) -> Device:
        """A new (unopened) device of ``form``.

        Args:
            form: The model's input form.
            batch_latency_us: Simulated backend only: override the batch latency (0 measures
                the host alone).
        """
        if self.backend == "sim":
            return SimulatedDevice(
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                batch_latency_us=(
                    self.batch_latency_us if batch_latency_us is None else batch_latency_us
                ),
                form=form,
                max_valid_num=self.max_valid_num,
            )
        from packrunner.devices.onnx import OnnxDevice

        if form not in self.paths:
            raise ConfigError(f"no {form} model: pass --{form.replace('_', '-')}-model")
        return OnnxDevice(self.paths[form], intra_op_num_threads=self.threads)

    def make_dynamic(self, form: InputForm = InputForm.PADDED) -> Device:
        """A new (unopened) device running the ``form`` model with dynamic axes: one
        onnxruntime session that takes any ``[rows, width]`` batch within the
        ``batch_size * seq_len`` token budget, up to ``seq_len`` wide (``PACKED``: what
        shape-aware packing plans for, widths a multiple of 8).

        Raises:
            ConfigError: The set has no such model (the simulated backend, or ``--model``).
        """
        from packrunner.devices.base import ShapeSet
        from packrunner.devices.onnx import OnnxDevice

        paths = {InputForm.PADDED: self.dynamic_padded, InputForm.PACKED: self.dynamic_packed}
        path = paths.get(form)
        if path is None:
            raise ConfigError(
                f"no {form} model with dynamic axes: the dynamic-shape peers and shape-aware "
                "packing run the embedded default model or a checkpoint (--checkpoint, --minilm) "
                "on --device onnx"
            )
        budget = self.batch_size * self.seq_len
        return OnnxDevice(
            path,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            intra_op_num_threads=self.threads,
            shapes=ShapeSet.dynamic(
                max_rows=max(self.batch_size, budget // 16),
                max_width=self.seq_len,
                max_tokens=budget,
            ),
        )

    def for_algorithm(self, algorithm: PackAlgorithm) -> Device:
        """A new device of the form ``algorithm`` feeds."""
        return self.make(InputForm.for_algorithm(algorithm))

    def vocab_size(self, requested: int) -> int:
        """The largest id count samples may draw from: ``requested``, capped by the vocabulary
        of every model in the set (read from its embedding tables)."""
        if self.backend == "sim":
            return requested
        limits = [
            device.input_value_limits.get("input_ids", requested)
            for device in (self.make(form) for form in self.paths)
        ]
        return min([requested, *limits])
