"""The embedded default model: trained (not random), with a tokenizer, and stable enough for long greedy parity
runs and quantization accuracy checks."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from bigcode_deploy.exporter.checkpoint import default_model_dir, load_model
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.eval import default_eval_files, evaluate, read_sources
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


# `bigcode-deploy eval` on a small sample (the first 40 of the README's 500 lines, 4 of its 32 perplexity windows),
# with bounds from the full runs (README, "Fill-in-the-middle and eval"). Measured here on the 40-line sample:
# perplexity 37.71 (fp32), 37.73 (int8), 37.84 (int4); left-to-right exact 0, 1, 0 of 40 lines (the full run: 27,
# 28, 23 of 500). The FIM-trained candidate (README; a model with FIM tokens) measured 34.98 / 34.98 / 35.55,
# left-to-right 2 / 2 / 2 and FIM 0 / 0 / 0 of 40 (full run: 38 / 39 / 34 and 5 / 5 / 5 of 500), so these bounds
# hold for either model embedded.
EVAL_SAMPLE = dict(lines=40, windows=4, window=256, prefix_tokens=136, suffix_tokens=68)
EVAL_FP32_PERPLEXITY = {"no FIM tokens": 37.71, "FIM tokens": 34.98}


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the held-out files are Python 3.11's standard library")
def test_eval_on_held_out_code_within_the_full_runs_bounds(bundles):
    sources = read_sources(default_eval_files())
    results = {}
    for name in ("portable", "int8", "int4"):
        with open_generator(bundles[name]) as g:
            results[name] = evaluate(g, sources, **EVAL_SAMPLE, progress=quiet)
    fp32, int8, int4 = results["portable"], results["int8"], results["int4"]
    kind = "FIM tokens" if fp32.fim.exact_match is not None else "no FIM tokens"
    assert fp32.perplexity == pytest.approx(EVAL_FP32_PERPLEXITY[kind], rel=0.03)
    # The quantization targets: int8 within 2% perplexity and 1 point, int4 within 8% and 3 points (on 40
    # lines one line is 2.5 points: allow one line for int8 and two for int4 against the fp32 sample).
    assert int8.perplexity <= fp32.perplexity * 1.02 and int4.perplexity <= fp32.perplexity * 1.08
    assert abs(int8.l2r.correct - fp32.l2r.correct) <= 1 and abs(int4.l2r.correct - fp32.l2r.correct) <= 2
    for r in results.values():
        assert r.l2r.lines == 40 and r.l2r.correct <= 8  # the full runs' rates are 5-8%
        if kind == "FIM tokens":
            assert r.fim.correct <= 4  # 1.0% in the full run: the FIM target is not met by this model
        else:
            assert r.fim.exact_match is None and "no FIM tokens" in r.fim.reason
