"""Config and checkpoint errors: each one clear message naming the field, tensor or file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigcode_deploy.exporter.checkpoint import default_model_dir, load_model
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.runtime.errors import CheckpointError, ConfigError


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(n_embd=30), "n_embd=30 is not divisible by n_head=4"),
        (dict(activation_function="tanhish"), "activation_function='tanhish'"),
        (dict(add_cross_attention=True), "add_cross_attention=True"),
        (dict(n_layer=0), "n_layer=0"),
    ],
)
def test_bad_config_is_one_clear_error(hf_checkpoint, changes, message):
    _, model_dir = hf_checkpoint()
    edit_config(model_dir, **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(model_dir)


def test_aliases_and_id2label():
    config = GPTBigCodeConfig.from_dict(
        dict(
            model_type="gpt_bigcode",
            hidden_size=64,
            num_attention_heads=8,
            num_hidden_layers=3,
            max_position_embeddings=128,
            id2label={"0": "a", "1": "b", "2": "c"},
        )
    )
    assert (config.n_embd, config.n_head, config.n_layer, config.n_positions) == (64, 8, 3, 128)
    assert config.num_labels == 3 and config.n_inner == 256 and config.head_dim == 8 and config.kv_dim == 8


def test_missing_tensor_names_it(hf_checkpoint):
    _, model_dir = hf_checkpoint()
    state = load_file(model_dir / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.bias is missing"):
        load_model(model_dir)


def test_unexpected_tensor_names_it(hf_checkpoint):
    _, model_dir = hf_checkpoint()
    state = load_file(model_dir / "model.safetensors")
    state["transformer.h.0.attn.q_attn.weight"] = torch.zeros(2, 2)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor transformer\.h\.0\.attn\.q_attn\.weight"):
        load_model(model_dir)


def test_config_weights_mismatch_names_tensor_and_shapes(hf_checkpoint):
    _, model_dir = hf_checkpoint()
    edit_config(model_dir, n_inner=64)  # the weights were made with 4 * n_embd = 128
    with pytest.raises(
        CheckpointError,
        match=r"tensor transformer\.h\.0\.mlp\.c_fc\.\w+ in model\.safetensors has shape \(128,.*implies \(64,",
    ):
        load_model(model_dir)


def test_head_weights_absent_for_task(hf_checkpoint):
    _, model_dir = hf_checkpoint("causal-lm")
    with pytest.raises(CheckpointError, match=r"tensor score\.weight is missing"):
        load_model(model_dir, task="sequence-classification")


def test_truncated_safetensors_names_file(hf_checkpoint):
    _, model_dir = hf_checkpoint()
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors.*truncated or corrupt"):
        load_model(model_dir)


def test_corrupt_bin_names_file(hf_checkpoint):
    _, model_dir = hf_checkpoint(save_kwargs=dict(safe_serialization=False))
    (model_dir / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read .*pytorch_model\.bin"):
        load_model(model_dir)


def test_missing_shard_names_it(hf_checkpoint):
    _, model_dir = hf_checkpoint(save_kwargs=dict(max_shard_size="20KB"))
    shard = sorted(model_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}"):
        load_model(model_dir)


def test_no_weights_and_no_dir(tmp_path, hf_checkpoint):
    _, model_dir = hf_checkpoint()
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(model_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(tmp_path / "empty")


def test_bad_dtype_and_task():
    with pytest.raises(ConfigError, match="unsupported dtype 'fp8'"):
        load_model(dtype="fp8")
    with pytest.raises(ConfigError, match="unknown task 'chat'"):
        load_model(task="chat")


def test_default_model_loads_in_every_dtype():
    assert (default_model_dir() / "config.json").is_file()
    for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model, config = load_model(dtype=dtype)
        assert model.transformer.wte.weight.dtype == torch_dtype
        assert model.lm_head.weight is model.transformer.wte.weight  # tied, absent from the file
        assert not any(p.is_meta for p in model.parameters())
        logits, presents = model(torch.tensor([[1, 2, 3]]))
        assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits.float()).all()
        assert presents[0].shape == (1, 3, 2 * config.head_dim)
