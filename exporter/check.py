"""The export-time check: onnx.checker (full, with shape inference), then ONNX Runtime against the stored torch
reference outputs, judged by the one verdict (bigcode_deploy.runtime.parity.judge) that optimize and verify use."""

from __future__ import annotations

from pathlib import Path

import onnx

from bigcode_deploy.runtime.backends import OrtBackend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.parity import ParityReport
from bigcode_deploy.runtime.reference import ReferenceOutputs
from bigcode_deploy.runtime.verify import verify_against


def check_bundle(bundle_dir: Path) -> ParityReport:
    """Raises BigCodeError when onnx.checker rejects the graph, ParityError when ONNX Runtime disagrees with the
    reference (the message names the step and the output, the layer for presents). Returns the report."""
    bundle = Bundle.open(bundle_dir)
    try:
        onnx.checker.check_model(str(bundle.graph_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BigCodeError(f"onnx.checker rejected the exported graph: {exc}") from None
    if bundle.manifest.dtype == "bf16":
        raise BigCodeError("bf16 graphs cannot be checked here: ONNX Runtime's CPU provider has no bf16 kernels")
    reference = ReferenceOutputs.load(bundle)
    with OrtBackend(bundle) as candidate:
        report = verify_against(reference, bundle, candidate, "ort")
    report.raise_on_failure("ONNX Runtime disagrees with the torch reference")
    return report
