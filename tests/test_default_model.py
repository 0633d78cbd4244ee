"""The embedded default model: trained (not random), with a tokenizer, and stable enough for long greedy parity
runs and quantization accuracy checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bigcode_deploy.exporter.checkpoint import default_model_dir, load_model
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.parity import QUANTIZED_CRITERIA
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.verify import verify_bundle
from bigcode_deploy.workflows.backends import open_any_backend
from bigcode_deploy.workflows.optimize import optimize_bundle

# Python the model never saw in training (written for this test), in the standard library's style.
SNIPPET = '''def read_lines(path, encoding="utf-8"):
    """Return the lines of a text file, without their line endings."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    portable = export_bundle(None, root / "portable", progress=quiet)
    out = {"portable": portable}
    out["ort"] = optimize_bundle(portable, root / "ort", target="ort", last_token_logits=True, progress=quiet)
    for scheme in ("int8", "int4"):
        out[scheme] = optimize_bundle(portable, root / scheme, target="ort", quantize=scheme, progress=quiet)
    return out


def test_ships_a_trained_checkpoint_with_tokenizer():
    directory = default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (directory / name).is_file(), name
    assert sum(p.stat().st_size for p in directory.iterdir()) < 20 * 2**20
    log = json.loads((directory / "training_log.json").read_text())
    assert log["log"][-1]["held_out_perplexity"] < 100


def test_perplexity_on_unseen_python_is_far_below_uniform():
    from tokenizers import Tokenizer

    model, config = load_model()
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(SNIPPET).ids])
    with torch.no_grad():
        logits, _ = model(ids)
    perplexity = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    # A random model scores about the vocabulary size (4096); the trained one must know some Python.
    assert perplexity < 40, perplexity


def test_long_greedy_run_identical_on_ort_and_torch(bundles):
    prompts = ["def fibonacci(n):", "import os\n\n\ndef main():", "class Stack:\n    def __init__(self):"]
    with open_generator(bundles["ort"]) as g:
        ids = [g.encode(p) for p in prompts]
        ort_tokens = g.generate(ids, max_new_tokens=64, stop_token_ids=())
    with open_generator(bundles["portable"], backend="torch", opener=open_any_backend) as g:
        torch_tokens = g.generate(ids, max_new_tokens=64, stop_token_ids=())
    assert ort_tokens == torch_tokens


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_accuracy_against_fp32(bundles, scheme):
    report = verify_bundle(bundles[scheme])
    criteria = QUANTIZED_CRITERIA[scheme]
    assert report.top1_agreement >= criteria["min_top1"], report.table()
    assert report.mean_abs_logit_error <= criteria["max_mean_abs"], report.table()


def test_int8_is_closer_than_int4(bundles):
    int8, int4 = (verify_bundle(bundles[s], write=False) for s in ("int8", "int4"))
    assert int8.mean_abs_logit_error < int4.mean_abs_logit_error / 2
    assert int8.top1_agreement >= int4.top1_agreement


def test_text_prompt_streams_python_looking_text(bundles):
    with open_generator(bundles["ort"]) as g:
        pieces, _ = g.stream_text("def fibonacci(n):", max_new_tokens=48)
        text = "".join(pieces)
    assert len(text) > 20 and "\n" in text  # a body on new lines, not noise on one line
