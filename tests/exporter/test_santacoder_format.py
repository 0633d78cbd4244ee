"""The original SantaCoder format (model_type gpt2, GPT2LMHeadCustomModel, multi-query, Conv1D layouts) read directly.

No original-format oracle runs here: each checkpoint is built from a transformers GPTBigCode checkpoint by the inverse
of the public modeling code's layout (exporter.santacoder_format.to_original_state_dict), then judged against that
transformers model (4.53, the oracle) through load, export and verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.checkpoint import load_model
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.exporter.santacoder_format import SANTACODER_FORMAT, to_original_state_dict
from bigcode_deploy.runtime.errors import CheckpointError, ConfigError
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.verify import verify_bundle
from tests.exporter.test_export import drive_from_manifest, hf_decode
from tests.exporter.test_model_vs_transformers import FP32_ATOL, assert_decode_close
from tests.helpers import left_padded_batch, make_hf_model

# config.json of a public original-format fine-tune, as published (Vipitis/santacoder-finetuned-Shadertoys, revision
# beb2c9e4c987869851ae969a3595c632c6a246a3): the fields, keys and values of bigcode/santacoder's format.
REAL_CONFIG = {
    "_name_or_path": "bigcode/santacoder",
    "activation_function": "gelu_fast",
    "architectures": ["GPT2LMHeadCustomModel"],
    "attention_head_type": "multiquery",
    "attn_pdrop": 0.1,
    "auto_map": {
        "AutoConfig": "configuration_gpt2_mq.GPT2CustomConfig",
        "AutoModelForCausalLM": "modeling_gpt2_mq.GPT2LMHeadCustomModel",
    },
    "bos_token_id": 49152,
    "embd_pdrop": 0.1,
    "eos_token_id": 49152,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_embd": 2048,
    "n_head": 16,
    "n_inner": 8192,
    "n_layer": 24,
    "n_positions": 2048,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "torch_dtype": "float32",
    "transformers_version": "4.28.1",
    "use_cache": True,
    "vocab_size": 49280,
}


def original_config(hf_config) -> dict:
    """config.json as the original format writes it (the fields of the public Vipitis/santacoder fine-tune's)."""
    return {
        "_name_or_path": "bigcode/santacoder",
        "activation_function": hf_config.activation_function,
        "architectures": ["GPT2LMHeadCustomModel"],
        "attention_head_type": "multiquery",
        "auto_map": {
            "AutoConfig": "configuration_gpt2_mq.GPT2CustomConfig",
            "AutoModelForCausalLM": "modeling_gpt2_mq.GPT2LMHeadCustomModel",
        },
        "bos_token_id": hf_config.bos_token_id,
        "eos_token_id": hf_config.eos_token_id,
        "layer_norm_epsilon": hf_config.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_embd": hf_config.n_embd,
        "n_head": hf_config.n_head,
        "n_inner": hf_config.n_inner,
        "n_layer": hf_config.n_layer,
        "n_positions": hf_config.n_positions,
        "reorder_and_upcast_attn": False,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_type": "cls_index",
        "torch_dtype": "float32",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": hf_config.vocab_size,
    }


def write_original(hf_model, model_dir: Path, shards: bool = False) -> Path:
    """An original-format checkpoint of hf_model: pytorch_model.bin (as bigcode/santacoder ships it) with the causal
    `attn.bias` / `attn.masked_bias` buffers old transformers saved and the tied lm_head; or two safetensors shards
    that split each layer's q_attn from its kv_attn."""
    config = hf_model.config
    state = to_original_state_dict({k: v.detach().clone() for k, v in hf_model.state_dict().items()}, config.n_embd)
    n = config.n_positions
    for i in range(config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(original_config(config), indent=2))
    if not shards:
        torch.save(state, model_dir / "pytorch_model.bin")
        return model_dir
    from safetensors.torch import save_file

    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    first = {k: v.contiguous() for k, v in state.items() if "kv_attn" not in k}
    second = {k: v.contiguous() for k, v in state.items() if "kv_attn" in k}
    names = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, part in names.items():
        save_file(part, str(model_dir / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in names.items() for k in part}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir


@pytest.fixture
def original(tmp_path):
    """(transformers GPTBigCode model, the same weights as an original-format checkpoint directory)."""
    hf_model = make_hf_model("causal-lm", activation_function="gelu_fast", n_layer=3)
    return hf_model, write_original(hf_model, tmp_path / "santacoder")


def test_original_format_logits_and_presents_match_transformers(original):
    hf_model, model_dir = original
    assert "kv_attn" in " ".join(torch.load(model_dir / "pytorch_model.bin", weights_only=True))
    assert_decode_close(hf_model, model_dir, "causal-lm", "fp32", atol=FP32_ATOL)
    _, config = load_model(model_dir)
    assert config.source_format == SANTACODER_FORMAT
    assert (config.multi_query, config.activation_function, config.attention_softmax_in_fp32) == (
        True,
        "gelu_fast",
        False,
    )


def test_original_format_sharded_q_and_kv_in_different_files(tmp_path):
    hf_model = make_hf_model("causal-lm", activation_function="gelu_fast")
    model_dir = write_original(hf_model, tmp_path / "sharded", shards=True)
    assert_decode_close(hf_model, model_dir, "causal-lm", "fp32", atol=FP32_ATOL, steps=1)


def test_original_format_through_export_and_verify(original, tmp_path):
    hf_model, model_dir = original
    bundle = export_bundle(model_dir, tmp_path / "bundle", progress=quiet)  # the export's own ORT check passes
    assert verify_bundle(bundle).ok
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["format"] == SANTACODER_FORMAT
    # The manifest keeps every field of config.json (model fields canonical); the bundle's config.json is GPTBigCode.
    assert manifest["config"]["auto_map"]["AutoConfig"] == "configuration_gpt2_mq.GPT2CustomConfig"
    assert manifest["config"]["architectures"] == ["GPT2LMHeadCustomModel"]
    assert (manifest["config"]["model_type"], manifest["config"]["multi_query"]) == ("gpt_bigcode", True)
    hf_config = json.loads((bundle / "config.json").read_text())
    assert "auto_map" not in hf_config and hf_config["architectures"] == ["GPTBigCodeForCausalLM"]
    # The ONNX graph, driven from the manifest alone, against transformers' GPTBigCode: logits and every present.
    ids, mask = (t.numpy() for t in left_padded_batch(hf_model.config.vocab_size))
    expected, tokens = hf_decode(hf_model, ids, mask, steps=2)
    actual = drive_from_manifest(bundle, ids, mask, steps=2, next_tokens=tokens)
    for step, (e, a) in enumerate(zip(expected, actual)):
        np.testing.assert_allclose(a["logits"], e.logits.numpy(), atol=1e-4, rtol=0, err_msg=f"step {step} logits")
        for layer, present in enumerate(e.past_key_values):
            np.testing.assert_allclose(
                a[f"present.{layer}.key_value"], present.numpy(), atol=1e-4, rtol=0, err_msg=f"step {step} {layer}"
            )


def test_real_santacoder_config_reads():
    config = GPTBigCodeConfig.from_dict(REAL_CONFIG)
    assert config.source_format == SANTACODER_FORMAT
    assert (config.n_embd, config.n_head, config.n_layer, config.n_inner, config.vocab_size) == (
        2048,
        16,
        24,
        8192,
        49280,
    )
    assert (config.multi_query, config.activation_function, config.eos_token_id) == (True, "gelu_fast", 49152)
    assert config.extra["architectures"] == ["GPT2LMHeadCustomModel"]
    assert "auto_map" not in config.to_dict(extra=False) and "auto_map" in config.to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_head_type": None}, "attention_head_type=None"),
        ({"attention_head_type": "multihead"}, "attention_head_type='multihead'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"architectures": ["GPT2LMHeadModel"]}, r"architectures=\['GPT2LMHeadModel'\] of a gpt2 multi-query config"),
    ],
)
def test_other_configs_are_refused_naming_what_is_supported(change, message):
    raw = {**REAL_CONFIG, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as info:
        GPTBigCodeConfig.from_dict(raw)
    text = str(info.value)
    assert "\n" not in text
    if "attention_head_type" in message or "model_type" in message:
        assert "gpt_bigcode" in text and "GPT2LMHeadCustomModel" in text and "multiquery" in text


def test_plain_gpt2_checkpoint_is_one_line_on_the_cli(tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    result = CliRunner().invoke(main, ["export", str(model_dir), str(tmp_path / "out")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]) and "GPT2LMHeadCustomModel" in errors[0]
    assert not (tmp_path / "out").exists()


def test_linear_layout_or_missing_half_is_refused(original, tmp_path):
    hf_model, model_dir = original
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    transposed = dict(
        state, **{"transformer.h.1.attn.kv_attn.weight": state["transformer.h.1.attn.kv_attn.weight"].t()}
    )
    torch.save(transposed, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.attn\.kv_attn\.weight has shape \(16, 32\)"):
        load_model(model_dir)
    del state["transformer.h.2.attn.kv_attn.bias"]
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.2\.attn\.kv_attn\.bias is missing"):
        load_model(model_dir)


def test_integer_half_or_both_layouts_are_refused_before_mapping(original):
    hf_model, model_dir = original
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    q = state["transformer.h.0.attn.q_attn.weight"]
    torch.save(
        dict(state, **{"transformer.h.0.attn.q_attn.weight": q.to(torch.int64)}), model_dir / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.q_attn\.weight' holds int64 values"):
        load_model(model_dir)  # torch.cat would have promoted it to float: zero query weights, parity "ok"
    nan = q.clone()
    nan[0, 0] = float("nan")
    torch.save(dict(state, **{"transformer.h.0.attn.q_attn.weight": nan}), model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.q_attn\.weight' holds 1 non-finite"):
        load_model(model_dir)  # named as the file names it, not as the mapped c_attn
    fused = torch.zeros(q.shape[0] + 2 * (q.shape[0] // 4), q.shape[0])
    torch.save(dict(state, **{"transformer.h.0.attn.c_attn.weight": fused}), model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="fused c_attn layout in an original SantaCoder checkpoint"):
        load_model(model_dir)
