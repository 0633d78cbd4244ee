"""The one verdict (runtime/parity.py): its criteria on hand-made outputs, and the checks using it on exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import CheckpointError, ParityError
from bigcode_deploy.runtime.parity import QUANTIZED_CRITERIA, _top1_agreement, judge
from bigcode_deploy.runtime.reference import ReferenceOutputs, reference_prompts
from bigcode_deploy.runtime.verify import verify_bundle
from tests.helpers import make_hf_model


def test_near_tie_flips_do_not_decide_quantized_top1():
    reference = np.array([[2.0, 1.99, 0.0], [3.0, 0.0, 1.0], [0.0, 5.0, 4.0]])  # (positions, vocab)
    candidate = np.array([[1.9, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 4.0, 5.0]])  # flips rows 0 (gap 0.01) and 2 (1.0)
    assert _top1_agreement(candidate, reference, 0.0) == pytest.approx(1 / 3)
    assert _top1_agreement(candidate, reference, QUANTIZED_CRITERIA["int8"]["tie_margin"]) == pytest.approx(2 / 3)
    candidate[1, 0] = np.nan
    assert _top1_agreement(candidate, reference, 10.0) == pytest.approx(2 / 3)  # a NaN row never agrees


def test_a_model_with_a_tiny_context_exports_and_is_checked(tmp_path):
    """n_positions 6: the prompt recipe and the steps shrink to fit instead of indexing past the context."""
    assert [len(p) for p in reference_prompts(101, 6)] == [1, 1, 1]
    make_hf_model("causal-lm", seed=1, n_positions=6).save_pretrained(tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", progress=lambda m: None)
    record = Bundle.open(bundle).manifest.reference
    assert record.steps == 4 and all(len(p) == 1 for p in record.prompts)  # 1 prompt token + 4 steps <= 6
    assert verify_bundle(bundle).ok


def test_nan_weights_fail_the_export_check(tmp_path):
    """Also a NaN the reference prompts never reach (a position embedding row past them): every weight is checked
    on load, so no parity check can pass over it."""
    for seed, (parameter, index) in enumerate(
        (("transformer.h.1.mlp.c_fc.weight", (0, 0)), ("transformer.wpe.weight", (40, 0)))
    ):
        model = make_hf_model("causal-lm", seed=2 + seed)
        with torch.no_grad():
            dict(model.named_parameters())[parameter][index] = float("nan")
        model.save_pretrained(tmp_path / f"ckpt{seed}")
        for check in (True, False):
            with pytest.raises(CheckpointError, match=f"tensor {parameter} in model.safetensors holds 1 non-finite"):
                export_bundle(tmp_path / f"ckpt{seed}", tmp_path / "b", check=check, progress=lambda m: None)
            assert not (tmp_path / "b").exists()


def test_a_reduced_precision_graph_is_judged_against_fp32_not_against_itself(tmp_path):
    make_hf_model("causal-lm", seed=3, n_layer=3).save_pretrained(tmp_path / "ckpt")
    bundle = Bundle.open(export_bundle(tmp_path / "ckpt", tmp_path / "b", dtype="fp16", progress=lambda m: None))
    reference = ReferenceOutputs.load(bundle)
    assert reference.main_error is not None and (reference.main_error[:, 0] > 0).all()  # torch fp16 does differ
    report = judge(reference, reference.run, bundle.manifest, "the fp32 reference itself")
    assert report.ok and "relative" not in report.criterion and "torch fp16" in report.criterion
    no_terms = ReferenceOutputs.load(bundle)
    no_terms.main_error = None
    with pytest.raises(ParityError, match="has no error terms of a torch fp16 model"):
        judge(no_terms, reference.run, bundle.manifest, "x")
    worse = ReferenceOutputs.load(bundle).run
    for step, ref_step in zip(worse.steps, reference.run.steps):  # add 4x torch fp16's own max error to logits
        step.main = ref_step.main + 4 * reference.main_error[:, 0].max()
    assert not judge(reference, worse, bundle.manifest, "worse").ok
