"""Shared fixtures (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import make_hf_model, save_hf_model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (task, **config overrides, save kwargs) -> (hf_model, model_dir)."""

    def make(task="causal-lm", save_kwargs=None, seed=0, **overrides):
        model = make_hf_model(task, seed=seed, **overrides)
        model_dir = tmp_path / f"{task}-{seed}-{len(list(tmp_path.iterdir()))}"
        save_hf_model(model, model_dir, **(save_kwargs or {}))
        return model, model_dir

    return make


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    """{name: bundle dir}: 2-layer exports (MQA fp32, MHA fp32, MQA fp16) of transformers-made checkpoints."""
    from bigcode_deploy.exporter.export import export_bundle
    from bigcode_deploy.runtime.progress import quiet

    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, dtype, multi_query in (("mqa", "fp32", True), ("mha", "fp32", False), ("mqa-fp16", "fp16", True)):
        model_dir = root / f"ckpt-{name}"
        make_hf_model("causal-lm", seed=3, multi_query=multi_query).save_pretrained(model_dir)
        out[name] = export_bundle(model_dir, root / name, dtype=dtype, check=False, progress=quiet)
    return out
