"""Weight files as untrusted input: wrong dtypes, bad shard indexes, legacy and refused pickles, each one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.checkpoint import load_model, tensor_shapes
from bigcode_deploy.runtime.errors import CheckpointError
from tests.helpers import make_hf_model


def one_line_export_error(model_dir: Path, out: Path) -> str:
    result = CliRunner().invoke(main, ["export", str(model_dir), str(out), "--no-check"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3 and lines[-1].startswith("error: "), lines
    assert not out.exists()
    return lines[-1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.float8_e4m3fn])
def test_integer_or_bool_tensor_of_the_right_shape_is_refused(hf_checkpoint, tmp_path, dtype):
    _, model_dir = hf_checkpoint()
    state = load_file(model_dir / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"] = torch.ones_like(state["transformer.h.1.mlp.c_fc.weight"], dtype=dtype)
    save_file(state, model_dir / "model.safetensors")
    line = one_line_export_error(model_dir, tmp_path / "out")
    name = str(dtype).removeprefix("torch.")
    assert f"tensor transformer.h.1.mlp.c_fc.weight in model.safetensors holds {name} values" in line
    assert "a weight must be float32, float16 or bfloat16" in line


def test_float64_weights_are_converted(hf_checkpoint):
    _, model_dir = hf_checkpoint()
    state = {k: v.double() for k, v in load_file(model_dir / "model.safetensors").items()}
    save_file(state, model_dir / "model.safetensors")
    model, _ = load_model(model_dir)
    assert model.transformer.wte.weight.dtype == torch.float32


def write_index(model_dir: Path, weight_map) -> None:
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (["model-00001-of-00002.safetensors"], "is not a shard index: it needs a non-empty object weight_map"),
        ({}, "is not a shard index"),
        ({"transformer.wte.weight": 7}, "weight_map['transformer.wte.weight'] = 7 is not a .safetensors file name"),
        ({"transformer.wte.weight": ["a.safetensors"]}, "is not a .safetensors file name"),
        ({"transformer.wte.weight": "../other/model.safetensors"}, "= '../other/model.safetensors' is not a"),
        ({"transformer.wte.weight": "/etc/passwd"}, "= '/etc/passwd' is not a .safetensors file name"),
        ({"transformer.wte.weight": "model.bin"}, "= 'model.bin' is not a .safetensors file name"),
        ({"transformer.wte.weight": ".."}, "= '..' is not a .safetensors file name"),
    ],
)
def test_a_shard_index_that_is_not_a_mapping_of_file_names_is_one_line(hf_checkpoint, tmp_path, weight_map, message):
    _, model_dir = hf_checkpoint(save_kwargs=dict(max_shard_size="20KB"))
    write_index(model_dir, weight_map)
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "model.safetensors.index.json" in line and message in line, line


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A checkpoint in 20 kB safetensors shards, and its good index text."""
    model_dir = tmp_path_factory.mktemp("sharded") / "ckpt"
    make_hf_model("causal-lm", seed=0).save_pretrained(model_dir, max_shard_size="20KB")
    return model_dir, (model_dir / "model.safetensors.index.json").read_text()


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )
)
def test_any_index_json_value_is_one_line(sharded, index):
    """Whatever JSON value the index holds (none names the real shards), loading ends in one CheckpointError."""
    model_dir, good = sharded
    index_path = model_dir / "model.safetensors.index.json"
    index_path.write_text(json.dumps(index))
    try:
        with pytest.raises(CheckpointError) as caught:
            load_model(model_dir)
        assert "\n" not in str(caught.value)
    finally:
        index_path.write_text(good)


def test_a_legacy_bin_loads_like_the_zip_one(hf_checkpoint):
    """torch.save's pre-1.6 (non-zip) format is read (into memory: it cannot be memory-mapped), not called corrupt."""
    _, model_dir = hf_checkpoint(save_kwargs=dict(safe_serialization=False))
    expected = {
        k: v.clone() for k, v in load_model(model_dir)[0].state_dict().items()
    }  # copies: the load maps the file
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save(state, model_dir / "legacy.bin", _use_new_zipfile_serialization=False)
    os.replace(model_dir / "legacy.bin", model_dir / "pytorch_model.bin")
    legacy = load_model(model_dir)[0].state_dict()
    assert legacy.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(legacy[name], value), name


class Payload:
    """An object whose pickle calls a function when loaded: weights_only loading refuses the global."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize(
    "payload, name", [(Payload(os.getcwd), "posix.getcwd"), (Payload(os.system, "true"), "posix.system")]
)
def test_a_refused_pickle_is_one_line_that_does_not_advise_weights_only_false(hf_checkpoint, tmp_path, payload, name):
    _, model_dir = hf_checkpoint(save_kwargs=dict(safe_serialization=False))
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": payload}, model_dir / "pytorch_model.bin")
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "holds Python objects" in line and name in line and "safetensors" in line, line
    assert "weights_only" not in line


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a pickle", "neither zip nor legacy format"),
        (b"PK\x03\x04" + b"\0" * 100, "truncated or corrupt"),
    ],
)
def test_a_corrupt_bin_is_one_line(hf_checkpoint, tmp_path, content, message):
    _, model_dir = hf_checkpoint(save_kwargs=dict(safe_serialization=False))
    (model_dir / "pytorch_model.bin").write_bytes(content)
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "pytorch_model.bin" in line and message in line and "weights_only" not in line, line


def test_a_bin_that_is_not_a_state_dict_is_one_line(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint(save_kwargs=dict(safe_serialization=False))
    torch.save({"state_dict": {"a": torch.zeros(1)}}, model_dir / "pytorch_model.bin")
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "does not hold a state dict" in line


def test_shapes_come_from_the_header(hf_checkpoint):
    """tensor_shapes reads the safetensors header (every tensor's shape); a file cut short is still one error."""
    _, model_dir = hf_checkpoint()
    path = model_dir / "model.safetensors"
    shapes = tensor_shapes(path)
    assert shapes["transformer.wte.weight"] == (101, 32) and len(shapes) == 2 + 2 + 12 * 2
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    cut = model_dir / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: header + 16])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        tensor_shapes(cut)  # safetensors checks the data's extent against the header: still one error


def test_missing_embeddings_are_refused_before_building(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint()
    state = load_file(model_dir / "model.safetensors")
    del state["transformer.wpe.weight"]
    save_file(state, model_dir / "model.safetensors")
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "tensor transformer.wpe.weight is missing from model.safetensors" in line


def test_a_layer_count_other_than_n_layer_names_both(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint()
    state = {k: v for k, v in load_file(model_dir / "model.safetensors").items() if ".h.1." not in k}
    save_file(state, model_dir / "model.safetensors")
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "declares n_layer=2 but the weight files in" in line and "hold 1 layer(s)" in line


def test_a_checkpoint_tokenizer_that_does_not_read_is_one_line_before_any_work(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint()
    (model_dir / "tokenizer.json").write_text("{not json")
    assert "tokenizer.json is not a tokenizer the tokenizers library reads" in one_line_export_error(
        model_dir, tmp_path / "out"
    )
    (model_dir / "tokenizer.json").write_text('{"model": 5}')  # JSON, but not a tokenizer
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "tokenizer.json is not a tokenizer the tokenizers library reads" in line and "re-save its tokenizer" in line


def test_tokenizer_files_that_are_not_small_regular_files_are_one_line(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint()
    (model_dir / "tokenizer.json").symlink_to(tmp_path / "nowhere")
    assert "tokenizer.json" in one_line_export_error(model_dir, tmp_path / "out")
    (model_dir / "tokenizer.json").unlink()
    with open(model_dir / "special_tokens_map.json", "wb") as big:
        big.truncate(1500 << 20)  # sparse: refused by its size before anything reads it
    assert "special_tokens_map.json" in one_line_export_error(model_dir, tmp_path / "out")


def test_a_weight_beyond_the_export_dtypes_range_is_named(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint()
    state = {k: v.double() for k, v in load_file(model_dir / "model.safetensors").items()}
    state["transformer.h.0.attn.c_attn.weight"][0, 0] = 1e300  # finite in float64, inf in float32
    save_file(state, model_dir / "model.safetensors")
    line = one_line_export_error(model_dir, tmp_path / "out")
    assert "tensor transformer.h.0.attn.c_attn.weight in model.safetensors holds values beyond fp32's range" in line
