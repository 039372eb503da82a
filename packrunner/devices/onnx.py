"""OnnxDevice: onnxruntime sessions at a fixed shape (or several), driven by one worker thread."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx

# onnx.load raises protobuf's DecodeError for bytes that are not a model; protobuf ships no stubs.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]

from packrunner.devices.base import (
    BatchShape,
    Device,
    OutputLayout,
    OutputSpec,
    ShapeSet,
    TensorSpec,
)
from packrunner.errors import ConfigError, DeviceError

__all__ = ["BATCH_COUPLING_OPS", "OnnxDevice"]

# Ops whose result for one sample can depend on the other samples of its batch, or that take
# a padding mask instead of our additive block-diagonal bias. onnxruntime's fused attention
# (what its transformer optimizer and int8 quantizer emit) drops or cannot express the segment
# bias, and dynamic quantization picks one scale from the whole batch's activations: either way
# packed samples would influence each other, so such models are refused unless the caller opts
# in (after checking equivalence with packrunner.bench.accuracy).
BATCH_COUPLING_OPS: Final = frozenset(
    {
        "Attention",
        "QAttention",
        "MultiHeadAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
        "GroupQueryAttention",
        "DecoderAttention",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
    }
)

# ONNX TensorProto element types the runner can feed (token ids, masks, lengths).
_INTEGER_TYPES: dict[int, np.dtype[Any]] = {
    int(onnx.TensorProto.INT32): np.dtype(np.int32),
    int(onnx.TensorProto.INT64): np.dtype(np.int64),
}


class OnnxDevice(Device):
    """Runs an ONNX model with onnxruntime, at one shape or several.

    The model is inspected once at construction (names, dtypes, shapes), so a model that does
    not fit the runner is refused before any thread starts; the sessions are created in
    :meth:`open`, on the worker thread that owns them.

    Three ways to run shapes: a fixed-shape model (one shape, the default); a model with
    dynamic axes and ``shapes`` (one session serves every shape of a dynamic
    :class:`~packrunner.ShapeSet`, or the buckets of a compiled one); or one fixed-shape file per
    bucket (``model_path`` a mapping ``{(rows, width): path}``, one session each).
    :attr:`input_specs` describe the ``[batch_size, seq_len]`` shape (for a mapping, the widest
    bucket's); every batch is run at the shape of its feeds.

    Args:
        model_path: The ``.onnx`` file, or one fixed-shape file per bucket.
        batch_size: Rows, when the model's batch dim is symbolic (otherwise read from it).
        seq_len: Tokens per row, when the model's sequence dim is symbolic.
        max_valid_num: Length of ``unpack_info`` / sample slots, when symbolic.
        intra_op_num_threads: onnxruntime threads; default: every core of the machine.
        providers: onnxruntime execution providers.
        output_layouts: Layout per output name, for outputs whose layout cannot be told from
            their shape (by default ``[B, S, ...]`` is per token, ``[max_valid_num, S, ...]`` per
            sample slot, ``[B, K, ...]`` per segment, ``[max_valid_num, ...]`` per sample).
        output_names: Only fetch these outputs (default: all).
        allow_spinning: Let idle onnxruntime threads spin between runs (lower latency for one
            device; turn off when several sessions share the cores).
        allow_batch_coupling_ops: Accept a model with fused attention or dynamic quantization
            ops (:data:`BATCH_COUPLING_OPS`), which can make one sample's outputs depend on its
            batch mates. Only after checking packed against padded results yourself.
        shapes: The shapes a dynamic-axes model is run at (default: ``[batch_size, seq_len]``
            only). It must include ``[batch_size, seq_len]`` and be no wider.

    Raises:
        ConfigError: A file is missing, empty or not an ONNX model, the model's inputs are not
            integer tensors of one shape, several shapes are asked of a fixed-shape model, or
            the bucket files disagree with each other or with their shapes.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | Mapping[BatchShape, str | os.PathLike[str]],
        *,
        batch_size: int | None = None,
        seq_len: int | None = None,
        max_valid_num: int | None = None,
        intra_op_num_threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        output_layouts: Mapping[str, OutputLayout] | None = None,
        output_names: Sequence[str] | None = None,
        allow_spinning: bool = True,
        allow_batch_coupling_ops: bool = False,
        shapes: ShapeSet | None = None,
    ) -> None:
        if isinstance(model_path, Mapping):
            self._init_buckets(
                model_path,
                max_valid_num=max_valid_num,
                intra_op_num_threads=intra_op_num_threads,
                providers=providers,
                output_layouts=output_layouts,
                output_names=output_names,
                allow_spinning=allow_spinning,
                allow_batch_coupling_ops=allow_batch_coupling_ops,
            )
            return
        # Everything needed to build a replica (a fresh session after a hang).
        self._arguments: dict[str, Any] = {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "max_valid_num": max_valid_num,
            "intra_op_num_threads": intra_op_num_threads,
            "providers": providers,
            "output_layouts": output_layouts,
            "output_names": output_names,
            "allow_spinning": allow_spinning,
            "allow_batch_coupling_ops": allow_batch_coupling_ops,
            "shapes": shapes,
        }
        self._bucket_devices: dict[BatchShape, OnnxDevice] = {}
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(f"model_path {str(self.model_path)!r} is not a file")
        if self.model_path.stat().st_size == 0:
            raise ConfigError(f"model_path {str(self.model_path)!r} is empty, not an ONNX model")
        try:
            model = onnx.load(str(self.model_path), load_external_data=False)
        except DecodeError as exc:
            raise ConfigError(f"{str(self.model_path)!r} is not an ONNX model: {exc}") from exc
        graph = model.graph
        coupling = sorted({node.op_type for node in graph.node} & BATCH_COUPLING_OPS)
        if coupling and not allow_batch_coupling_ops:
            raise ConfigError(
                f"model {self.model_path.name} contains {coupling}: fused attention ignores the "
                "block-diagonal segment bias and dynamic quantization scales each batch as a "
                "whole, so packed samples would influence each other. Use the unfused fp32 "
                "graph (packrunner's builder or `packrunner convert` output), or pass "
                "allow_batch_coupling_ops=True after proving equivalence with "
                "packrunner.bench.accuracy.compare_results"
            )
        initializers = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        symbols = {"batch": batch_size, "seq": seq_len, "valid": max_valid_num}
        self._input_specs = {i.name: _input_spec(i, symbols) for i in inputs}
        # Symbolic dims (e.g. "batch", "sequence") take the value they got on the inputs, so
        # outputs that share them resolve too.
        self._dim_params: dict[str, int] = {}
        for value in inputs:
            for dim, size in zip(_dims(value), self._input_specs[value.name].shape, strict=True):
                if dim.dim_param:
                    self._dim_params[dim.dim_param] = size
        self.batch_size, self.seq_len = _batch_shape(self._input_specs, batch_size, seq_len)
        slots = [s.shape[0] for s in self._input_specs.values() if len(s.shape) == 1]
        self.max_valid_num = (
            max_valid_num if max_valid_num is not None else (slots[0] if slots else None)
        )
        wanted = list(output_names) if output_names is not None else [o.name for o in graph.output]
        declared = {o.name: o for o in graph.output}
        missing = [name for name in wanted if name not in declared]
        if missing:
            raise ConfigError(f"model has no output(s) {missing}; it has {sorted(declared)}")
        layouts = dict(output_layouts or {})
        self._output_specs = {
            name: self._output_spec(declared[name], layouts.get(name)) for name in wanted
        }
        self._value_limits = _embedding_sizes(graph, set(self._input_specs))
        self.intra_op_num_threads = intra_op_num_threads or os.cpu_count() or 1
        self.providers = tuple(providers)
        self.allow_spinning = allow_spinning
        self._session: Any = None
        self._shapes = self._check_shapes(model, shapes)

    def _check_shapes(self, model: onnx.ModelProto, shapes: ShapeSet | None) -> ShapeSet:
        if shapes is None:
            return ShapeSet.fixed(self.batch_size, self.seq_len)
        if (self.batch_size, self.seq_len) not in shapes or shapes.max_width != self.seq_len:
            raise ConfigError(
                f"shapes {shapes} must include [batch_size, seq_len] = "
                f"[{self.batch_size}, {self.seq_len}] and be no wider"
            )
        if not shapes.is_single:
            fixed = [
                value.name
                for value in model.graph.input
                if value.name in self._input_specs
                and len(_dims(value)) == 2
                and any(d.HasField("dim_value") and d.dim_value > 0 for d in _dims(value))
            ]
            if fixed:
                raise ConfigError(
                    f"model {self.model_path.name} has fixed dims on {fixed}; running several "
                    "shapes needs dynamic batch and sequence axes (build_bert_onnx(dynamic=True)) "
                    "or one file per shape"
                )
        return shapes

    def _init_buckets(
        self, paths: Mapping[BatchShape, str | os.PathLike[str]], **options: Any
    ) -> None:
        """One fixed-shape device per bucket; this one describes the widest and runs them all."""
        if not paths:
            raise ConfigError("model_path mapping names no bucket")
        shapes = ShapeSet.buckets(paths)
        devices = {shape: OnnxDevice(paths[shape], **options) for shape in shapes.compiled}
        for (rows, width), device in devices.items():
            if (device.batch_size, device.seq_len) != (rows, width):
                raise ConfigError(
                    f"bucket [{rows}, {width}] file {device.model_path.name} is compiled for "
                    f"[{device.batch_size}, {device.seq_len}]"
                )
        widest = devices[shapes.compiled[-1]]
        for device in devices.values():
            names = (list(device.input_specs), dict(device.output_specs))
            if names != (list(widest.input_specs), dict(widest.output_specs)):
                raise ConfigError(
                    f"bucket files {device.model_path.name} and {widest.model_path.name} "
                    "differ in their inputs or outputs"
                )
        # Describe the widest bucket; run each batch on its own bucket's session.
        for name, value in vars(widest).items():
            setattr(self, name, value)
        self._arguments = {**options, "shapes": None}
        self._bucket_paths = dict(paths)
        self._bucket_devices = devices
        self._shapes = shapes

    @property
    def shapes(self) -> ShapeSet:
        """The shapes this device runs."""
        return self._shapes

    @property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """The model's inputs at the fixed shape."""
        return self._input_specs

    @property
    def output_specs(self) -> Mapping[str, OutputSpec]:
        """The fetched outputs and their layouts."""
        return self._output_specs

    @property
    def input_value_limits(self) -> Mapping[str, int]:
        """Rows of the embedding table each input indexes (its vocabulary size), if any."""
        return self._value_limits

    def open(self) -> None:
        """Create the onnxruntime session(s) (on the worker thread that will run them)."""
        if self._bucket_devices:
            for device in self._bucket_devices.values():
                device.open()
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_num_threads
        options.inter_op_num_threads = 1
        # Masked attention scores (-10000 bias) underflow to subnormal floats in Softmax, which
        # x86 handles on a slow path: flushing them to zero cut the default model's packed
        # batch from ~37 ms to ~30 ms here, and they are exactly 0 after Softmax either way.
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if not self.allow_spinning:
            # Idle intra-op threads otherwise spin after each run, stealing cores from the
            # runner's own threads and from other sessions in the process.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=list(self.providers)
            )
        except Exception as exc:
            raise DeviceError(f"onnxruntime could not load {self.model_path}: {exc}") from exc

    def run(
        self, feeds: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch; onnxruntime failures become :class:`~packrunner.DeviceError`."""
        if self._bucket_devices:
            shape = getattr(feeds.get("input_ids"), "shape", None)
            bucket = self._bucket_devices.get(shape)  # type: ignore[arg-type]
            if bucket is None:
                raise DeviceError(f"no bucket of shape {shape}; buckets: {self._shapes}")
            return bucket.run(feeds)
        if self._session is None:
            raise DeviceError("OnnxDevice.run() before open()")
        names = list(self._output_specs)
        try:
            values = self._session.run(names, dict(feeds))
        except Exception as exc:
            raise DeviceError(f"onnxruntime failed running {self.model_path.name}: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        """Drop the session(s)."""
        for device in self._bucket_devices.values():
            device.close()
        self._session = None

    def replica(self) -> OnnxDevice:
        """A new, unopened OnnxDevice over the same model file(s) and options."""
        if self._bucket_devices:
            return OnnxDevice(self._bucket_paths, **self._arguments)
        return OnnxDevice(self.model_path, **self._arguments)

    def _output_spec(self, value: onnx.ValueInfoProto, layout: OutputLayout | None) -> OutputSpec:
        dims = [
            d.dim_value if d.HasField("dim_value") else self._dim_params.get(d.dim_param)
            for d in _dims(value)
        ]
        if layout is None:
            stream = any(len(s.shape) == 1 for s in self._input_specs.values())
            layout = _infer_layout(
                value.name, dims, self.batch_size, self.seq_len, self.max_valid_num, stream
            )
        lead = 1 if layout in (OutputLayout.SAMPLES, OutputLayout.ROWS) else 2
        trailing = tuple(d if d is not None else -1 for d in dims[lead:])
        return OutputSpec(value.name, layout, trailing)


def _dims(value: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    return list(value.type.tensor_type.shape.dim)


def _input_spec(value: onnx.ValueInfoProto, symbols: Mapping[str, int | None]) -> TensorSpec:
    element = value.type.tensor_type.elem_type
    if element not in _INTEGER_TYPES:
        raise ConfigError(
            f"model input {value.name!r} has element type "
            f"{onnx.TensorProto.DataType.Name(element)}; packrunner feeds int32/int64 tensors"
        )
    dims = _dims(value)
    shape: list[int] = []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
            continue
        if len(dims) == 1:
            fixed = symbols["valid"]
        else:
            fixed = symbols["batch"] if axis == 0 else symbols["seq"]
        if fixed is None:
            raise ConfigError(
                f"model input {value.name!r} has a symbolic dim {dim.dim_param or '?'!r} at axis "
                f"{axis}; packrunner needs a fixed-shape model (convert it with `packrunner "
                "convert --batch-size B --seq-len S`, or pass batch_size/seq_len/max_valid_num)"
            )
        shape.append(fixed)
    if len(shape) not in (1, 2):
        raise ConfigError(f"model input {value.name!r} has rank {len(shape)}; expected 1 or 2")
    return TensorSpec(value.name, tuple(shape), _INTEGER_TYPES[element])


def _batch_shape(
    specs: Mapping[str, TensorSpec], batch_size: int | None, seq_len: int | None
) -> tuple[int, int]:
    shapes = {spec.shape for spec in specs.values() if len(spec.shape) == 2}
    if len(shapes) != 1:
        raise ConfigError(
            f"model's 2-D inputs must share one [batch_size, seq_len] shape, got "
            f"{ {name: spec.shape for name, spec in specs.items()} }"
        )
    (rows, columns) = shapes.pop()
    for name, expected, actual in (("batch_size", batch_size, rows), ("seq_len", seq_len, columns)):
        if expected is not None and expected != actual:
            raise ConfigError(f"{name}={expected} but the model is compiled for {actual}")
    return rows, columns


def _infer_layout(
    name: str,
    dims: list[int | None],
    batch_size: int,
    seq_len: int,
    max_valid_num: int | None,
    stream: bool,
) -> OutputLayout:
    lead = dims[:2]
    # Unpack/repack models (they take unpack_info) answer per sample slot.
    if stream and max_valid_num is not None and dims[:1] == [max_valid_num]:
        if len(dims) >= 2 and dims[1] == seq_len:
            return OutputLayout.SAMPLE_TOKENS
        return OutputLayout.SAMPLES
    if len(dims) >= 2 and lead == [batch_size, seq_len]:
        return OutputLayout.PACKED_TOKENS
    if len(dims) == 2 and dims[0] == batch_size:
        return OutputLayout.ROWS
    if len(dims) >= 3 and dims[0] == batch_size:
        return OutputLayout.SEGMENTS
    raise ConfigError(
        f"cannot tell the layout of output {name!r} with shape {dims}; pass output_layouts"
    )


def _embedding_sizes(graph: onnx.GraphProto, inputs: set[str]) -> dict[str, int]:
    """Rows of the embedding table each graph input indexes (through Casts), per input.

    An id at or beyond that makes onnxruntime's Gather fail the whole batch; knowing the bound
    lets the runner refuse the one bad sample at submit time instead.
    """
    initializers = {init.name: init for init in graph.initializer}
    # Follow value-preserving casts so converted models (int32 inputs cast to int64) count too.
    origin = {name: name for name in inputs}
    for node in graph.node:
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
    sizes: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[1] not in origin:
            continue
        table = initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is not None and axis == 0 and len(table.dims) >= 1:
            name, size = origin[node.input[1]], int(table.dims[0])
            sizes[name] = min(size, sizes.get(name, size))
    return sizes
