"""The export-time check: onnx.checker (full, with shape inference) and ONNX Runtime against the torch model.

Feeds the graph from its manifest: a left-padded batch of three prompts of different lengths through a prefill
(past length 0) and two cached decode steps, compared with the torch model that was just exported (the same
teacher-forced comparison `verify` uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from torch import nn

from exporter.errors import BigCodeError
from runtime.backends import OrtBackend, TorchBackend
from runtime.bundle import Bundle
from runtime.parity import TOLERANCES, ParityError, ParityReport
from runtime.verify import teacher_forced

DECODE_STEPS = 2


def check_bundle(bundle_dir: Path, model: nn.Module, steps: int = DECODE_STEPS) -> ParityReport:
    bundle = Bundle.open(bundle_dir)
    try:
        onnx.checker.check_model(str(bundle.graph_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BigCodeError(f"onnx.checker rejected the exported graph: {exc}") from None
    dtype = bundle.manifest["dtype"]
    if dtype == "bf16":
        raise BigCodeError("bf16 graphs cannot be checked here: ONNX Runtime's CPU provider has no bf16 kernels")
    atol, rtol = TOLERANCES[dtype]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, bundle.config["vocab_size"], n).tolist() for n in (5, 3, 1)]
    with TorchBackend(bundle, model=model) as reference, OrtBackend(bundle) as candidate:
        steps_report = teacher_forced(reference, candidate, bundle, prompts, steps, atol, rtol)
    report = ParityReport(dtype=dtype, atol=atol, rtol=rtol,
                          steps=[[s.logits] + ([s.presents] if s.presents else []) for s in steps_report])
    failure = report.first_failure()
    if failure:
        step, c = failure
        raise ParityError(
            f"ONNX Runtime disagrees with torch at step {step} on {c.name}: max abs diff {c.max_abs:.3g}, "
            f"{c.mismatches}/{c.size} values beyond abs {atol:g} and rel {rtol:g}"
        )
    return report
