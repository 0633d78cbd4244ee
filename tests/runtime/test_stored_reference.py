"""Verify against the torch reference outputs stored in the bundle: no torch, no checkpoint, and no false "ok"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BundleError, ParityError
from bigcode_deploy.runtime.hashing import sha256_file
from bigcode_deploy.runtime.manifest import GRAPH_FILE, MANIFEST_FILE, REFERENCE_FILE
from bigcode_deploy.runtime.parity import judge
from bigcode_deploy.runtime.reference import ReferenceOutputs
from bigcode_deploy.runtime.verify import verify_bundle
from tests.helpers import make_hf_model


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """{dtype: bundle dir} exported from a checkpoint that no longer exists (deleted after export), as a bundle
    copied to a CI machine or a service host would be."""
    root = tmp_path_factory.mktemp("shipped")
    checkpoint = root / "checkpoint"
    make_hf_model("causal-lm", seed=4, n_layer=3).save_pretrained(checkpoint)
    out = {}
    for dtype in ("fp32", "fp16"):
        exported = export_bundle(checkpoint, root / f"exported-{dtype}", dtype=dtype, progress=lambda m: None)
        out[dtype] = root / f"copy-{dtype}"
        shutil.copytree(exported, out[dtype])
    shutil.rmtree(checkpoint)
    return out


def tampered_copy(bundle, dest, change, rehash=True):
    """A copy whose graph's largest float initializer is changed by `change(array)`; with rehash, the manifest's
    sha256 is updated too, so only parity can notice."""
    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / GRAPH_FILE))
    weight = max(
        (t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)),
        key=lambda t: np.prod(t.dims),
    )
    array = numpy_helper.to_array(weight).copy()
    weight.CopyFrom(numpy_helper.from_array(change(array).astype(array.dtype), weight.name))
    onnx.save(model, str(dest / GRAPH_FILE))
    if rehash:
        manifest = json.loads((dest / MANIFEST_FILE).read_text())
        manifest["graph"]["sha256"][GRAPH_FILE] = sha256_file(dest / GRAPH_FILE)
        (dest / MANIFEST_FILE).write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_copied_bundle_verifies_without_its_checkpoint(shipped, dtype):
    report = verify_bundle(shipped[dtype])
    assert report.ok, report.table()
    assert report.reference == "stored" and len(report.steps) == 5 and report.compared > 0
    assert report.greedy_first_divergence is None
    record = Bundle.open(shipped[dtype]).manifest.reference
    assert record.dtype == "fp32" and record.model_dtype == dtype and record.steps == 4
    assert record.bytes < 200_000  # the stated bound: under 31 positions x vocab x 4 bytes plus statistics


def test_runtime_runs_a_bundle_end_to_end_without_torch(shipped):
    """Verify, generate and inspect through bigcode_deploy.runtime alone, in a fresh interpreter."""
    script = f"""
import sys
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.inspect import describe
from bigcode_deploy.runtime.verify import verify_bundle
report = verify_bundle({str(shipped["fp32"])!r}, write=False)
assert report.ok, report.table()
with open_generator({str(shipped["fp32"])!r}) as g:
    tokens = g.generate([[5, 17, 42], [8]], max_new_tokens=6, stop_token_ids=())
assert [len(t) for t in tokens] == [6, 6]
describe({str(shipped["fp32"])!r})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                or m.startswith(("bigcode_deploy.exporter", "bigcode_deploy.graphs", "bigcode_deploy.workflows")))
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_tampered_graph_fails_and_names_where(shipped, tmp_path, dtype):
    bad = tampered_copy(shipped[dtype], tmp_path / "bad", lambda a: a * 1.05)
    report = verify_bundle(bad)
    assert not report.ok
    assert report.failure_message().startswith("parity failed at prefill on ")
    saved = json.loads((bad / "parity.json").read_text())
    assert saved["ok"] is False
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "error: parity failed at prefill" in result.output


def test_a_tampered_graph_without_a_new_hash_is_refused(shipped, tmp_path):
    bad = tampered_copy(shipped["fp32"], tmp_path / "bad", lambda a: a * 1.05, rehash=False)
    with pytest.raises(BundleError, match="does not match the sha256"):
        verify_bundle(bad)


def test_nan_in_the_graph_is_a_failure_not_ok(shipped, tmp_path):
    def poison(a):
        a.flat[0] = np.nan
        return a

    bad = tampered_copy(shipped["fp32"], tmp_path / "nan", poison)
    report = verify_bundle(bad)
    assert not report.ok
    assert "non-finite value" in report.failure_message()


def test_a_changed_reference_file_is_refused(shipped, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shipped["fp32"], bad)
    (bad / REFERENCE_FILE).write_bytes((bad / REFERENCE_FILE).read_bytes()[:-1] + b"\1")
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2
    assert "reference_outputs.safetensors does not match the sha256" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_other_steps_need_a_live_reference(shipped):
    result = CliRunner().invoke(main, ["verify", str(shipped["fp32"]), "--steps", "2"])
    assert result.exit_code == 2 and "pass --model MODEL_DIR too" in result.output
    result = CliRunner().invoke(main, ["verify", str(shipped["fp32"]), "--model", "/nonexistent/ckpt"])
    assert result.exit_code == 2 and "/nonexistent/ckpt does not exist" in result.output
    for steps in ("0", "-1"):  # a verdict needs evidence: no decode step is refused, not passed
        result = CliRunner().invoke(main, ["verify", str(shipped["fp32"]), "--model", "/x", "--steps", steps])
        assert result.exit_code == 2 and "needs at least 1 cached decode step" in result.output


def test_the_verdict_needs_evidence_and_finite_values(shipped):
    bundle = Bundle.open(shipped["fp32"])
    reference = ReferenceOutputs.load(bundle)
    assert judge(reference, reference.run, bundle.manifest, "self").ok  # the reference against itself
    empty = ReferenceOutputs.load(bundle)
    for step in empty.run.steps:
        step.main = step.main[:0]
        step.present_stats = None
    nothing = judge(empty, empty.run, bundle.manifest, "empty")
    assert nothing.compared == 0 and not nothing.ok
    assert "nothing was compared" in nothing.failure_message()
    candidate = ReferenceOutputs.load(bundle).run
    candidate.steps[2].main[1, 3] = np.inf
    report = judge(reference, candidate, bundle.manifest, "inf")
    assert not report.ok and "decode 2: logits has 1 non-finite value(s), the first at index [1, 3]" in (
        report.failure_message()
    )
    with pytest.raises(ParityError, match="the candidate ran 1 step"):
        candidate.steps = candidate.steps[:1]
        judge(reference, candidate, bundle.manifest, "short")


def test_parity_is_reported_only_while_bound_to_the_graph(shipped, tmp_path):
    from bigcode_deploy.runtime.inspect import describe
    from bigcode_deploy.runtime.parity_record import parity_summary

    bundle_dir = tmp_path / "b"
    shutil.copytree(shipped["fp32"], bundle_dir)
    (bundle_dir / "parity.json").unlink(missing_ok=True)
    assert "parity      none (no parity.json" in describe(str(bundle_dir))
    verify_bundle(bundle_dir)
    assert parity_summary(Bundle.open(bundle_dir))["status"] == "ok"
    assert "parity      ok on ort against the stored reference" in describe(str(bundle_dir))
    # The graph changes (re-hashed, so the bundle still opens): the old report no longer speaks for it.
    changed = tampered_copy(bundle_dir, tmp_path / "changed", lambda a: a * 1.0001)
    summary = parity_summary(Bundle.open(changed))
    assert summary["status"] == "none" and "another graph" in summary["reason"]
    report = json.loads((bundle_dir / "parity.json").read_text())
    report["ok"] = "yes"
    (bundle_dir / "parity.json").write_text(json.dumps(report))
    assert parity_summary(Bundle.open(bundle_dir))["status"] == "none"


def test_the_cli_verifies_against_stored_outputs_with_torch_unimportable(shipped):
    """`bigcode-deploy verify BUNDLE` on a host without torch: a finder makes `import torch` fail."""
    script = f"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{{name}} is not installed on this host")

sys.meta_path.insert(0, NoTorch())
from bigcode_deploy.cli import main
main(["verify", {str(shipped["fp32"])!r}])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parity ok: ort vs stored fp32 reference" in result.stdout


def test_usage_errors_are_one_line(shipped):
    for command in (["optimize", str(shipped["fp32"]), "x", "--target", "bogus"], ["generate", str(shipped["fp32"])]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
