"""Optimum loads a causal-lm bundle directory as it is: ORTModelForCausalLM.from_pretrained(bundle) generates the
same greedy tokens as transformers on a left-padded batch, through the bundle's KV cache.

optimum-onnx is a test dependency (pyproject's test extra), imported plainly: a missing install must fail here, not
skip, since this is the check that the bundle's config.json/generation_config.json are what Optimum needs.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM

from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.exporter.hf_files import write_hf_files
from bigcode_deploy.runtime.manifest import GENERATION_CONFIG_FILE, HF_CONFIG_FILE
from tests.helpers import left_padded_batch, make_hf_model

PAD = 0  # the tiny config's bos/eos; prompts are drawn from 1..vocab-1


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module", params=[True, False], ids=["mqa", "mha"])
def exported(request, tmp_path_factory):
    """(transformers model, bundle dir) for a tiny random checkpoint exported with its KV cache."""
    root = tmp_path_factory.mktemp("optimum-mqa" if request.param else "optimum-mha")
    model = make_hf_model(multi_query=request.param)
    model.save_pretrained(root / "checkpoint")
    out = export_bundle(root / "checkpoint", root / "bundle", check=False, progress=quiet)
    return model, out


def record_runs(ort_model) -> list[tuple[int, int]]:
    """Wrap the model's session so each run records (input_ids length, past length of layer 0)."""
    calls: list[tuple[int, int]] = []
    run = ort_model.session.run
    past_axis = 1 if ort_model.config.multi_query else 2

    def recording_run(output_names, feeds, *args, **kwargs):
        calls.append((feeds["input_ids"].shape[1], feeds["past_key_values.0.key_value"].shape[past_axis]))
        return run(output_names, feeds, *args, **kwargs)

    ort_model.session.run = recording_run
    return calls


def test_bundle_carries_hf_files(exported):
    model, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hf_files"] == [HF_CONFIG_FILE, GENERATION_CONFIG_FILE]
    config = transformers.AutoConfig.from_pretrained(out)
    assert isinstance(config, transformers.GPTBigCodeConfig)
    assert config.architectures == ["GPTBigCodeForCausalLM"] and config.use_cache is True
    for name in (
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "multi_query",
        "activation_function",
        "layer_norm_epsilon",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(config, name) == getattr(model.config, name), name
    assert config.n_inner == (model.config.n_inner or 4 * model.config.n_embd)  # None means 4 * n_embd in both
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (PAD, PAD)


def test_optimum_greedy_matches_transformers(exported):
    model, out = exported
    ort_model = ORTModelForCausalLM.from_pretrained(out)  # the bundle directory, unmodified
    assert ort_model.can_use_cache and not ort_model.is_merged
    assert ort_model.config.model_type == "gpt_bigcode"
    calls = record_runs(ort_model)

    ids, mask = left_padded_batch(model.config.vocab_size, lengths=(7, 4, 2), pad_id=PAD)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    got = ort_model.generate(ids, **kwargs)

    assert got.shape == expected.shape and got.shape[1] > ids.shape[1]
    assert torch.equal(got, expected), f"optimum:\n{got}\ntransformers:\n{expected}"
    # Prefill with an empty past, then one token per step on the bundle's cache.
    steps = got.shape[1] - ids.shape[1]
    assert calls == [(ids.shape[1], 0)] + [(1, ids.shape[1] + i) for i in range(steps - 1)]


def test_hf_files_without_generation_config(tmp_path):
    """No generation_config.json in the checkpoint: a minimal one from the config's token ids; a graph without
    a cache says use_cache false; other tasks get no Hugging Face files."""
    config = GPTBigCodeConfig(
        vocab_size=101,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        multi_query=False,
    )
    source, staging = tmp_path / "checkpoint", tmp_path / "staging"
    source.mkdir()
    staging.mkdir()

    assert write_hf_files(source, staging, config, "causal-lm", cache=False) == [HF_CONFIG_FILE, GENERATION_CONFIG_FILE]
    assert json.loads((staging / GENERATION_CONFIG_FILE).read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    hf_config = transformers.AutoConfig.from_pretrained(staging)
    assert hf_config.use_cache is False and hf_config.multi_query is False and hf_config.pad_token_id == 3
    generation = transformers.GenerationConfig.from_pretrained(staging)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 3)

    other = tmp_path / "other"
    other.mkdir()
    for task in ("base", "sequence-classification", "token-classification"):
        assert write_hf_files(source, other, config, task) == []
    assert list(other.iterdir()) == []
