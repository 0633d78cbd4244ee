"""Every target's bundle runs on ONNX Runtime CPU with parity against the torch reference (the verify path)."""

import json

import pytest
from click.testing import CliRunner

import bigcode_deploy.workflows.optimize as optimize_workflow
from bigcode_deploy.cli import main
from bigcode_deploy.runtime.errors import LintError
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.verify import verify_bundle
from bigcode_deploy.workflows.optimize import optimize_bundle


@pytest.mark.parametrize(
    "source, target, last_token, expected_passes",
    [
        ("mqa", "portable", False, {"inline_functions": 4}),
        (
            "mha",
            "ort",
            True,
            {
                "inline_functions": 4,
                "last_token_logits": 1,
                "ort_fusions.gelu": 2,
                "ort_fusions.skip_layer_normalization": 5,
            },
        ),
        ("mqa-fp16", "tensorrt", False, {"mqa_broadcast_attention": 2, "inline_functions": 4}),
    ],
)
def test_target_bundle_matches_torch(tiny_bundles, tmp_path, source, target, last_token, expected_passes):
    out = optimize_bundle(
        tiny_bundles[source], tmp_path / target, target=target, last_token_logits=last_token, progress=quiet
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == target
    fired = {p["name"]: p["count"] for p in manifest["passes"]}
    assert all((p["count"] == 0) == (p["reason"] is not None) for p in manifest["passes"])  # a reason when 0
    assert {k: fired.get(k) for k in expected_passes} == expected_passes
    assert manifest["custom_ops"]["used"] == []
    report = verify_bundle(out)
    assert report.ok, report.table()
    assert all(s.top1 == 1.0 for s in report.steps)
    assert report.greedy_first_divergence is None


def test_tensorrt_needs_half_precision_and_refuses_failing_lint(tiny_bundles, tmp_path, monkeypatch):
    result = CliRunner().invoke(
        main, ["optimize", str(tiny_bundles["mqa"]), str(tmp_path / "t"), "--target", "tensorrt"]
    )
    assert result.exit_code == 2 and "pass --dtype fp16 or bf16" in result.output
    # A pipeline that leaves the custom ops in place fails the lint: the bundle is refused, not written.
    monkeypatch.setattr(optimize_workflow, "run_passes", lambda model, target, last_token_only: [])
    with pytest.raises(LintError, match="FusedMaskedSoftmax has no plugin mapping"):
        optimize_bundle(tiny_bundles["mqa-fp16"], tmp_path / "t", target="tensorrt", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_dtype_change_reexports_the_source(tiny_bundles, tmp_path):
    out = optimize_bundle(tiny_bundles["mqa"], tmp_path / "trt", target="tensorrt", dtype="fp16", progress=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["kv_cache"]["dtype"] == "float16"
    assert verify_bundle(out).ok
