"""A shipped bundle is untrusted input: edits to its manifest or reference file are refused in one line, and no
edit makes verify say "ok" on evidence that cannot judge (found by trying the change as an attacker would)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.hashing import sha256_file
from bigcode_deploy.runtime.manifest import MANIFEST_FILE, REFERENCE_FILE
from tests.helpers import make_hf_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    make_hf_model("causal-lm", seed=5).save_pretrained(root / "ckpt")
    return export_bundle(root / "ckpt", root / "b", check=False, progress=lambda m: None)


def edited(bundle, dest, manifest_edit=None, reference_edit=None):
    """A copy with the manifest and/or the reference tensors edited, every sha256 updated to match."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    if reference_edit is not None:
        tensors = load_file(str(dest / REFERENCE_FILE))
        reference_edit(tensors)
        save_file(tensors, str(dest / REFERENCE_FILE))
        manifest["reference"]["sha256"] = sha256_file(dest / REFERENCE_FILE)
    if manifest_edit is not None:
        manifest_edit(manifest)
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest))
    return dest


def nan_at_first(name):
    def edit(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = np.nan

    return edit


def set_key(path, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


CASES = {
    "nan-in-reference-logits": (None, nan_at_first("step0.main"), "non-finite"),
    "nan-in-present-stats": (None, nan_at_first("step2.present_stats"), "present statistics"),
    "present-stats-removed": (None, lambda t: [t.pop(k) for k in list(t) if k.endswith("present_stats")], "present"),
    "fewer-steps-than-the-file": (set_key(["reference", "steps"], 0), None, "where the recipe runs 4"),
    "reference-steps-a-string": (set_key(["reference", "steps"], "4"), None, "reference.steps"),
    "reference-file-null": (set_key(["reference", "file"], None), None, "reference.file"),
    "reference-dtype-fp16": (set_key(["reference", "dtype"], "fp16"), None, "reference.dtype"),
    "token-outside-vocabulary": (None, lambda t: t["tokens"].__setitem__((0, 0), 10**6), "step tokens"),
    "fake-quantization-claim": (
        set_key(["quantization"], {"scheme": "int8"}),
        None,
        "MatMulNBits nodes have bits none",
    ),
    "tokenizer-outside-the-bundle": (set_key(["tokenizer"], "../../tokenizer.json"), None, "tokenizer"),
    "dtype-a-list": (set_key(["dtype"], ["fp32"]), None, "dtype"),
    "source-not-an-object": (set_key(["source"], None), None, "source is not an object"),
    "inputs-emptied": (set_key(["inputs"], []), None, "inputs do not match"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_edited_bundle_is_refused_in_one_line(bundle, tmp_path, case):
    manifest_edit, reference_edit, message = CASES[case]
    bad = edited(bundle, tmp_path / "bad", manifest_edit, reference_edit)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2, result.output
    assert "parity ok" not in result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_garbage_reference_file_with_a_matching_hash_is_one_line(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / REFERENCE_FILE).write_bytes(b"\x07not safetensors")
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["reference"]["sha256"] = sha256_file(bad / REFERENCE_FILE)
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "not a readable safetensors file" in result.output


def test_a_graph_that_is_not_onnx_with_a_matching_hash_is_one_line(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "model.onnx").write_bytes(b"garbage" * 100)
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["graph"]["sha256"]["model.onnx"] = sha256_file(bad / "model.onnx")
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    for command in (["verify", str(bad)], ["inspect", str(bad)], ["generate", str(bad), "--ids", "1,2"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (command, result.output)


def test_non_finite_sampling_options_and_bench_sizes_are_one_line(bundle):
    runner = CliRunner()
    for option in (["--temperature", "nan"], ["--repetition-penalty", "inf"]):
        result = runner.invoke(main, ["generate", str(bundle), "--ids", "1,2", *option])
        assert result.exit_code == 2 and "must be a finite number" in result.output
    for option in (["--new-tokens", "0"], ["--batch", "0"], ["--repeats", "0"]):
        result = runner.invoke(main, ["bench", str(bundle), "--prompt-len", "4", *option])
        assert result.exit_code == 2 and "must be an integer >=" in result.output, result.output


def scale_errors(tensors):
    tensors["main_error"] = np.full_like(tensors["main_error"], 1e30)


def pad_rows_as_last(tensors):
    tensors["step0.last"] = np.zeros_like(tensors["step0.last"])


def extra_tensor(tensors):
    tensors["something_else"] = np.zeros(3, dtype=np.float32)


def float_last(tensors):
    tensors["step0.last"] = tensors["step0.last"].astype(np.float64)


MORE_CASES = {  # found by a second attack review
    "logits-positions-last-on-a-full-graph": (set_key(["logits_positions"], "last"), None, "outputs do not match"),
    "vocab-size-edited": (set_key(["config", "vocab_size"], 10**6), None, "do not match"),
    "multi-query-flipped": (set_key(["config", "multi_query"], False), None, "do not match"),
    "kv-sequence-axis": (set_key(["kv_cache", "sequence_axis"], 2), None, "kv_cache does not match"),
    "kv-template": (set_key(["kv_cache", "present_output"], "present.{lay}.key_value"), None, "kv_cache"),
    "kv-dtype": (set_key(["kv_cache", "dtype"], "bogus"), None, "kv_cache"),
    "dims-edited": (set_key(["dims", "sequence"], {"min": 1, "max": 2}), None, "dims.sequence"),
    "output-shape-scalar": (set_key(["outputs", 0, "shape"], []), None, "outputs do not match"),
    "wrong-last-rows": (None, pad_rows_as_last, "last-position index"),
    "float-last-index": (None, float_last, "last-position index"),
    "unknown-tensor": (None, extra_tensor, "other tensors"),
}


@pytest.mark.parametrize("case", sorted(MORE_CASES))
def test_more_edits_are_refused_in_one_line(bundle, tmp_path, case):
    manifest_edit, reference_edit, message = MORE_CASES[case]
    bad = edited(bundle, tmp_path / "bad", manifest_edit, reference_edit)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "parity ok" not in result.output, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_huge_torch_error_terms_cannot_make_a_zero_reference_pass(tmp_path):
    make_hf_model("causal-lm", seed=6).save_pretrained(tmp_path / "ckpt")
    fp16 = export_bundle(tmp_path / "ckpt", tmp_path / "b16", dtype="fp16", check=False, progress=lambda m: None)

    def zero_reference_huge_errors(tensors):
        scale_errors(tensors)
        for key in tensors:
            if key.endswith(".main"):
                tensors[key] = np.zeros_like(tensors[key])

    bad = edited(fp16, tmp_path / "bad", None, zero_reference_huge_errors)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "exceed 0.25 of the logits' magnitude" in result.output, result.output


def test_an_oversized_reference_file_is_refused_before_loading(bundle, tmp_path):
    def pad(tensors):
        tensors["step0.main"] = np.concatenate([tensors["step0.main"]] * 200)

    bad = edited(bundle, tmp_path / "bad", None, pad)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "larger than a reference of this model can be" in result.output


def test_force_never_writes_inside_the_input(bundle, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bundle, src)
    result = CliRunner().invoke(
        main, ["optimize", str(src), str(src / "model.onnx"), "--target", "portable", "--force"]
    )
    assert result.exit_code == 2 and "lies inside the command's own input" in result.output
    assert (src / "model.onnx").is_file()


def test_ids_and_stop_tokens_are_checked(bundle):
    runner = CliRunner()
    for option in (["--ids", "1,,2"], ["--ids", "1", "--stop-token", "-5"], ["--ids", "1", "--stop-token", "99999"]):
        result = runner.invoke(main, ["generate", str(bundle), *option])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_deeply_nested_json_and_a_file_in_the_output_path_are_one_line(bundle, tmp_path):
    bad = tmp_path / "deep"
    shutil.copytree(bundle, bad)
    (bad / MANIFEST_FILE).write_text("[" * 100000 + "]" * 100000)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "is not valid JSON" in result.output and len(result.output.splitlines()) == 1
    (tmp_path / "a_file").write_text("x")
    result = CliRunner().invoke(
        main, ["optimize", str(bundle), str(tmp_path / "a_file" / "sub"), "--target", "portable"]
    )
    assert result.exit_code == 2 and "cannot create" in result.output and len(result.output.splitlines()) == 1


def test_a_quantization_claim_must_match_the_graphs_bits(bundle, tmp_path):
    from bigcode_deploy.workflows.optimize import optimize_bundle

    int8 = optimize_bundle(
        bundle, tmp_path / "int8", target="ort", quantize="int8", check=False, progress=lambda m: None
    )
    bad = edited(int8, tmp_path / "bad", set_key(["quantization", "scheme"], "int4"))
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "claims int4 quantization but the graph's MatMulNBits nodes have bits [8]" in (
        result.output
    )
