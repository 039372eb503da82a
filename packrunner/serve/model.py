"""The served model: which graph, which device, which tokenizer, what it outputs.

Three sources, decided by ``--model``:

* none: the embedded default BERT (random weights, QA head) from :mod:`packrunner.models`, with
  the generated WordPiece tokenizer of :mod:`packrunner.serve.tokenizer`;
* a Hugging Face checkpoint folder (``config.json`` + ``model.safetensors`` + optional
  ``tokenizer.json``): the packed graph is built with :func:`checkpoint_model_path` (no torch);
* an ONNX file (a packed graph, e.g. from ``packrunner convert``), with ``--tokenizer``.

Built QA graphs end in span logits only; :func:`expose_hidden_state` adds the encoder's last
hidden state as an output so the embedding routes can mean-pool it (a model with a
``sentence_embedding`` output is used as is: the graph already mean-pools per sample).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.helper
import onnx.numpy_helper

from packrunner.config import RunnerConfig
from packrunner.devices.base import Device, OutputLayout, OutputSpec
from packrunner.devices.onnx import OnnxDevice
from packrunner.devices.simulated import SimulatedDevice
from packrunner.errors import ConfigError
from packrunner.models import checkpoint_model_path, default_model_path
from packrunner.serve.settings import ServeSettings
from packrunner.serve.tokenizer import TextEncoder, default_tokenizer_path

__all__ = [
    "EMBEDDING_OUTPUTS",
    "ServedModel",
    "expose_hidden_state",
    "load_model",
    "per_token",
]

HIDDEN_STATE = "last_hidden_state"
POOLED = "sentence_embedding"
#: Outputs an embedding can come from, in order of preference.
EMBEDDING_OUTPUTS = (POOLED, HIDDEN_STATE)
_QA_WEIGHT = "qa_outputs.weight"


@dataclass(frozen=True, slots=True)
class ServedModel:
    """Everything the front ends need to know about the model.

    Attributes:
        name: The served name (URL path segment, ``model`` field).
        source: Where it came from (for ``/info``).
        device: The device the runner drives.
        config: The runner configuration (batch shape, queue bound, timeout).
        encoder: Tokeniser for the text routes, or None (text routes answer 400).
        outputs: The device's outputs.
        labels: Class names of a ``logits`` output (``/predict``), by index.
    """

    name: str
    source: str
    device: Device
    config: RunnerConfig
    encoder: TextEncoder | None
    outputs: Mapping[str, OutputSpec]
    labels: tuple[str, ...]

    @property
    def embedding_output(self) -> str | None:
        """The output the embedding routes use, if any."""
        return next((name for name in EMBEDDING_OUTPUTS if name in self.outputs), None)

    @property
    def has_qa(self) -> bool:
        """Whether the model has span logits (``/qa``)."""
        return "start_logits" in self.outputs and "end_logits" in self.outputs

    @property
    def has_classifier(self) -> bool:
        """Whether the model has per-sequence class logits (``/predict``)."""
        spec = self.outputs.get("logits")
        return spec is not None and not per_token(spec)

    @property
    def is_reranker(self) -> bool:
        """Whether the classifier has one label, a relevance score (``/rerank``, as in TEI)."""
        return self.has_classifier and len(self.labels) == 1

    def embedding(self, result: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """One sequence's embedding: the pooled output, or the mean of its hidden states."""
        if POOLED in result:
            return np.asarray(result[POOLED], dtype=np.float32)
        hidden = np.asarray(result[HIDDEN_STATE], dtype=np.float32)
        pooled: npt.NDArray[np.float32] = hidden.mean(axis=0, dtype=np.float32)
        return pooled

    @property
    def hidden_size(self) -> int | None:
        """Width of the embeddings, if the model has them."""
        name = self.embedding_output
        if name is None:
            return None
        trailing = self.outputs[name].trailing_shape
        return int(trailing[-1]) if trailing else None


def per_token(spec: OutputSpec) -> bool:
    """Whether an output has one value per token (else one per sequence)."""
    return spec.layout in (OutputLayout.PACKED_TOKENS, OutputLayout.SAMPLE_TOKENS)


def expose_hidden_state(source: Path, target: Path) -> Path:
    """Write ``source`` (a built packed QA graph) with its last hidden state as an extra output.

    The QA head is one Gemm over the encoder's ``[tokens, H]`` stream; its input is reshaped to
    ``[batch_size, seq_len, H]`` and published as ``last_hidden_state`` (per token, so the
    runner cuts it back per sequence like the logits).
    """
    if target.is_file():
        return target
    model = onnx.load(str(source))
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "Gemm" and _QA_WEIGHT in n.input[1:2]), None)
    if head is None:
        raise ConfigError(f"{source} has no {_QA_WEIGHT} Gemm to take the hidden state from")
    weight = next(i for i in graph.initializer if i.name == _QA_WEIGHT)
    hidden = int(weight.dims[1])
    rows, columns = (d.dim_value for d in graph.input[0].type.tensor_type.shape.dim)
    shape_name = "serve_hidden_shape"
    graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([rows, columns, hidden], np.int64), shape_name)
    )
    graph.node.append(onnx.helper.make_node("Reshape", [head.input[0], shape_name], [HIDDEN_STATE]))
    graph.output.append(
        onnx.helper.make_tensor_value_info(
            HIDDEN_STATE, onnx.TensorProto.FLOAT, [rows, columns, hidden]
        )
    )
    onnx.checker.check_model(model)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    onnx.save(model, str(partial))
    partial.replace(target)
    return target


def _with_hidden_state(path: Path) -> Path:
    model = onnx.load(str(path), load_external_data=False)
    names = {o.name for o in model.graph.output}
    if names & set(EMBEDDING_OUTPUTS) or not any(
        i.name == _QA_WEIGHT for i in model.graph.initializer
    ):
        return path
    return expose_hidden_state(path, path.with_name(f"{path.stem}-hidden.onnx"))


def _labels(folder: Path) -> tuple[str, ...]:
    config = folder / "config.json"
    if not config.is_file():
        return ()
    id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
    return tuple(str(id2label[key]) for key in sorted(id2label, key=int))


def load_model(settings: ServeSettings) -> ServedModel:
    """Build (or find in the cache) the model ``settings`` describe, with its tokenizer.

    Raises:
        ConfigError: The model or tokenizer cannot be used.
        ModelFormatError: A checkpoint cannot be read.
    """
    config = RunnerConfig(
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        max_valid_num=settings.max_valid_num,
        timeout_us=settings.batch_timeout_us,
        max_queue_size=settings.max_queued_sequences,
    )
    tokenizer: Path | None = Path(settings.tokenizer) if settings.tokenizer else None
    labels: tuple[str, ...] = ()
    if settings.model is None:
        path = _with_hidden_state(
            default_model_path(
                "packed",
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                max_valid_num=config.max_valid_num,
            )
        )
        tokenizer = tokenizer or default_tokenizer_path()
        name, source = "packrunner-bert", "default (random-weight BERT, QA head)"
    else:
        given = Path(settings.model).expanduser()
        name, source = given.stem if given.is_file() else given.name, str(given)
        if given.is_dir():
            path = _with_hidden_state(
                checkpoint_model_path(
                    given,
                    "packed",
                    batch_size=config.batch_size,
                    seq_len=config.seq_len,
                    max_valid_num=config.max_valid_num,
                )
            )
            if tokenizer is None and (given / "tokenizer.json").is_file():
                tokenizer = given / "tokenizer.json"
            labels = _labels(given)
        elif given.is_file():
            path = given
        else:
            raise ConfigError(f"--model {given} is neither a checkpoint folder nor a file")
    device: Device
    if settings.device == "sim":
        device = SimulatedDevice(
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            batch_latency_us=settings.sim_batch_latency_us,
        )
        source = f"SimulatedDevice ({settings.sim_batch_latency_us} us/batch)"
    else:
        # OnnxDevice does not spin by default: spinning intra-op threads would take the cores
        # the HTTP/gRPC loop needs to parse requests and deliver results.
        device = OnnxDevice(path, intra_op_num_threads=settings.threads)
    encoder = None
    if tokenizer is not None:
        encoder = TextEncoder.from_file(tokenizer, settings.input_limit)
    outputs = dict(device.output_specs)
    if "logits" in outputs and not labels:
        classes = outputs["logits"].trailing_shape
        labels = tuple(f"LABEL_{i}" for i in range(int(classes[-1]) if classes else 0))
    return ServedModel(
        name=settings.name or name,
        source=source,
        device=device,
        config=config,
        encoder=encoder,
        outputs=outputs,
        labels=labels,
    )
