"""Config validation, weight normalization, checkpoint loading, builder argument checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from safetensors.numpy import save_file

from packrunner import InputForm
from packrunner.models import (
    DEFAULT_CONFIG,
    HEADS,
    BertConfig,
    Head,
    ModelFormatError,
    build_bert_onnx,
    expected_parameter_shapes,
    has_qa_head,
    input_names,
    load_hf_checkpoint,
    normalize_weights,
    output_names,
    random_bert_weights,
    reference_forward,
)
from packrunner.models.reference import erf

TINY = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_layers=2,
    num_heads=4,
    intermediate_size=32,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def _hf_config(config: BertConfig, **overrides: object) -> dict[str, object]:
    hf: dict[str, object] = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }
    hf.update(overrides)
    return hf


def _write_checkpoint(
    folder: Path, config: BertConfig, *, prefix: str = "", qa: bool = True
) -> None:
    weights = random_bert_weights(config, seed=1, with_qa_head=qa)
    tensors: dict[str, npt.NDArray[Any]] = {
        (name if name.startswith("qa_outputs") else prefix + name): value
        for name, value in weights.items()
    }
    # Real checkpoints carry non-parameter buffers too; the loader must ignore them.
    tensors[prefix + "embeddings.position_ids"] = np.arange(
        config.max_position_embeddings, dtype=np.int64
    ).reshape(1, -1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_hf_config(config)))


# --- BertConfig. ------------------------------------------------------------------------------


def test_default_config() -> None:
    assert DEFAULT_CONFIG == BertConfig(
        vocab_size=30522,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        intermediate_size=512,
        max_position_embeddings=512,
        type_vocab_size=2,
    )
    assert DEFAULT_CONFIG.head_dim == 64
    assert DEFAULT_CONFIG.hidden_act == "gelu"


@pytest.mark.parametrize(
    "overrides",
    [
        {"hidden_size": 10},  # not divisible by 4 heads
        {"num_layers": 0},
        {"vocab_size": True},
        {"hidden_act": "relu"},
        {"layer_norm_eps": 0.0},
    ],
)
def test_config_rejects_invalid(overrides: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 32,
    }
    fields.update(overrides)
    with pytest.raises(ModelFormatError):
        BertConfig(**fields)


def test_config_from_hf_dict_rejects_other_models() -> None:
    # The RoBERTa family is built (tests/models/test_roberta_checkpoint.py); MPNet is not.
    with pytest.raises(ModelFormatError, match="mpnet"):
        BertConfig.from_hf_dict(_hf_config(TINY, model_type="mpnet"))
    with pytest.raises(ModelFormatError, match="relative_key"):
        BertConfig.from_hf_dict(_hf_config(TINY, position_embedding_type="relative_key"))
    with pytest.raises(ModelFormatError, match="gelu_new"):
        BertConfig.from_hf_dict(_hf_config(TINY, hidden_act="gelu_new"))
    incomplete = _hf_config(TINY)
    del incomplete["num_attention_heads"]
    with pytest.raises(ModelFormatError, match="num_attention_heads"):
        BertConfig.from_hf_dict(incomplete)


# --- Weights. ---------------------------------------------------------------------------------


def test_random_weights_deterministic_and_complete() -> None:
    a = random_bert_weights(TINY, seed=7)
    b = random_bert_weights(TINY, seed=7)
    c = random_bert_weights(TINY, seed=8)
    shapes = expected_parameter_shapes(TINY, with_qa_head=True)
    assert list(a) == list(shapes)
    for name, shape in shapes.items():
        assert a[name].shape == shape
        assert a[name].dtype == np.float32
        assert np.array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    # Non-trivial LayerNorm / biases / QA head, so mis-wiring them shows in outputs.
    assert not np.allclose(a["embeddings.LayerNorm.weight"], 1.0)
    assert not np.allclose(a["encoder.layer.0.output.LayerNorm.bias"], 0.0)
    assert float(np.std(a["qa_outputs.weight"])) > 0.1
    assert 0.01 < float(np.std(a["embeddings.word_embeddings.weight"])) < 0.03
    assert not has_qa_head(random_bert_weights(TINY, seed=7, with_qa_head=False))


def test_normalize_accepts_bert_prefix_and_drops_extras() -> None:
    weights = random_bert_weights(TINY, seed=2)
    prefixed: dict[str, npt.NDArray[Any]] = {
        (name if name.startswith("qa_outputs") else "bert." + name): value.astype(np.float64)
        for name, value in weights.items()
    }
    prefixed["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
    prefixed["bert.embeddings.position_ids"] = np.arange(64).reshape(1, 64)
    normalized = normalize_weights(TINY, prefixed)
    assert list(normalized) == list(weights)
    for name, value in normalized.items():
        assert value.dtype == np.float32
        assert np.array_equal(value, weights[name])
    assert has_qa_head(prefixed)


def test_normalize_errors_name_the_problem() -> None:
    weights = random_bert_weights(TINY, seed=2)
    missing = dict(weights)
    del missing["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ModelFormatError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        normalize_weights(TINY, missing)

    wrong = dict(weights)
    wrong["encoder.layer.0.attention.self.key.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(ModelFormatError, match=r"attention\.self\.key\.weight.*\(16, 8\)"):
        normalize_weights(TINY, wrong)

    both = dict(weights)
    both["bert.embeddings.LayerNorm.bias"] = weights["embeddings.LayerNorm.bias"]
    with pytest.raises(ModelFormatError, match="both"):
        normalize_weights(TINY, both)

    half_qa = dict(weights)
    del half_qa["qa_outputs.bias"]
    with pytest.raises(ModelFormatError, match="incomplete QA head"):
        normalize_weights(TINY, half_qa)

    ints = dict(weights)
    ints["embeddings.LayerNorm.bias"] = np.zeros(16, np.int64)
    with pytest.raises(ModelFormatError, match="non-float"):
        normalize_weights(TINY, ints)


def test_normalize_copies_by_default() -> None:
    weights = random_bert_weights(TINY, seed=2)
    normalized = normalize_weights(TINY, weights)
    normalized["embeddings.LayerNorm.bias"][0] += 1.0
    assert weights["embeddings.LayerNorm.bias"][0] != normalized["embeddings.LayerNorm.bias"][0]


# --- Checkpoint loading. ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_hf_checkpoint_round_trip(tmp_path: Path, prefix: str) -> None:
    _write_checkpoint(tmp_path, TINY, prefix=prefix)
    config, weights = load_hf_checkpoint(tmp_path)
    assert config == TINY
    expected = random_bert_weights(TINY, seed=1)
    assert list(weights) == list(expected)
    for name in expected:
        assert np.array_equal(weights[name], expected[name])


def test_load_hf_checkpoint_sharded(tmp_path: Path) -> None:
    weights = random_bert_weights(TINY, seed=1, with_qa_head=False)
    names = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(tmp_path / shard))
    index = {"weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(TINY)))
    _, loaded = load_hf_checkpoint(tmp_path)
    assert all(np.array_equal(loaded[n], weights[n]) for n in names)


def test_load_hf_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match=r"config\.json, model\.safetensors"):
        load_hf_checkpoint(empty)

    mpnet = tmp_path / "mpnet"
    _write_checkpoint(mpnet, TINY)
    (mpnet / "config.json").write_text(json.dumps(_hf_config(TINY, model_type="mpnet")))
    with pytest.raises(ModelFormatError, match="model_type"):
        load_hf_checkpoint(mpnet)

    truncated = tmp_path / "truncated"
    _write_checkpoint(truncated, TINY)
    weights = random_bert_weights(TINY, seed=1)
    del weights["encoder.layer.1.attention.self.value.weight"]
    save_file(weights, str(truncated / "model.safetensors"))
    with pytest.raises(
        ModelFormatError, match=r"encoder\.layer\.1\.attention\.self\.value\.weight"
    ):
        load_hf_checkpoint(truncated)

    corrupt = tmp_path / "corrupt"
    _write_checkpoint(corrupt, TINY)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError, match="cannot read"):
        load_hf_checkpoint(corrupt)


# --- Builder arguments and graph interface. ---------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("form", tuple(InputForm))
def test_graph_interface(form: InputForm, head: Head) -> None:
    model = build_bert_onnx(
        TINY,
        random_bert_weights(TINY, seed=0),
        form=form,
        head=head,
        batch_size=3,
        seq_len=8,
        max_valid_num=5,
    )
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert tuple(i.name for i in graph.input) == input_names(form)
    assert tuple(o.name for o in graph.output) == output_names(head)
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT32
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ([5] if value.name == "unpack_info" else [3, 8])
    rows = 5 if form == "unpack_repack" else 3
    expected = {
        "start_logits": [rows, 8],
        "end_logits": [rows, 8],
        "last_hidden_state": [rows, 8, 16],
        "sentence_embedding": {"packed": [3, 5, 16], "padded": [3, 16], "unpack_repack": [5, 16]}[
            form
        ],
    }
    for value in graph.output:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == expected[value.name]
    # Initializers keep the Hugging Face names, and nothing unused is left in the file.
    initializer_names = {t.name for t in graph.initializer}
    assert "encoder.layer.1.attention.self.query.weight" in initializer_names
    read = {name for node in graph.node for name in node.input}
    assert initializer_names <= read
    # Sanity bound on graph size: the per-layer op count must not explode.
    assert len(graph.node) < 120


def test_build_rejects_bad_arguments() -> None:
    weights = random_bert_weights(TINY, seed=0)
    with pytest.raises(ValueError, match="form"):
        build_bert_onnx(TINY, weights, form="ragged")
    with pytest.raises(ValueError, match="head"):
        build_bert_onnx(TINY, weights, form="packed", head="mlm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_bert_onnx(TINY, weights, form="packed", seq_len=65)
    with pytest.raises(ValueError, match="batch_size"):
        build_bert_onnx(TINY, weights, form="packed", batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="opset"):
        build_bert_onnx(TINY, weights, form="packed", seq_len=8, opset=16)
    no_qa = random_bert_weights(TINY, seed=0, with_qa_head=False)
    with pytest.raises(ModelFormatError, match="qa_outputs"):
        build_bert_onnx(TINY, no_qa, form="packed", seq_len=8, head="qa")
    build_bert_onnx(TINY, no_qa, form="packed", seq_len=8, head="encoder")


# --- Numpy reference. -------------------------------------------------------------------------


def test_erf_matches_math_erf() -> None:
    xs = np.linspace(-7.0, 7.0, 1001)
    assert np.array_equal(erf(xs), np.array([math.erf(x) for x in xs]))
    assert erf(np.zeros((2, 3))).shape == (2, 3)


def test_reference_forward_outputs_and_validation() -> None:
    weights = random_bert_weights(TINY, seed=0)
    out = reference_forward(TINY, weights, [1, 2, 3], [0, 0, 1])
    assert out["last_hidden_state"].shape == (3, 16)
    assert out["start_logits"].shape == out["end_logits"].shape == (3,)
    assert np.allclose(out["sentence_embedding"], out["last_hidden_state"].mean(axis=0))
    # Default token types are zeros.
    same = reference_forward(TINY, weights, [1, 2, 3], [0, 0, 0])
    assert np.array_equal(
        reference_forward(TINY, weights, [1, 2, 3])["start_logits"], same["start_logits"]
    )
    assert "start_logits" not in reference_forward(
        TINY, random_bert_weights(TINY, seed=0, with_qa_head=False), [1]
    )
    with pytest.raises(ValueError, match="length"):
        reference_forward(TINY, weights, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="vocabulary"):
        reference_forward(TINY, weights, [50])
    with pytest.raises(ValueError, match="token_type_ids"):
        reference_forward(TINY, weights, [1], [2])
