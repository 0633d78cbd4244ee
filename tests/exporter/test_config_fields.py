"""The manifest's config keeps every field of config.json, also those the model does not use."""

from __future__ import annotations

import json

from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.hf_files import hf_config

# Fields the bigcode fork of transformers wrote into StarCoder's config.json (as in codeparrot/starcoder-conala's),
# plus an alias and a label map.
RAW = {
    "model_type": "gpt_bigcode",
    "architectures": ["GPTBigCodeForCausalLM"],
    "hidden_size": 32,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 64,
    "vocab_size": 101,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "inference_runner": 0,
    "max_batch_size": None,
    "max_sequence_length": None,
    "pad_key_length": True,
    "validate_runner_input": True,
    "id2label": {"0": "neg", "1": "pos"},
    "transformers_version": "4.28.0.dev0",
}


def test_every_field_is_kept_and_model_fields_are_canonical():
    config = GPTBigCodeConfig.from_dict(RAW)
    full = config.to_dict()
    for key, value in RAW.items():
        if key != "hidden_size":
            assert full[key] == value, key
    assert full["n_embd"] == 32 and "hidden_size" not in full  # the alias under its canonical name
    assert json.loads(json.dumps(full)) == full
    assert GPTBigCodeConfig.from_dict(full).to_dict() == full  # round trip
    model_only = config.to_dict(extra=False)
    assert "pad_key_length" not in model_only and "inference_runner" not in model_only
    # The bundle's config.json (read by Optimum and transformers) holds the model's fields only.
    assert "pad_key_length" not in hf_config(config, "causal-lm", cache=True)
