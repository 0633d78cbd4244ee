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
        set_key(["quantization"], {"scheme": "int8", "bits": 8, "block_size": 32}),
        None,
        "MatMulNBits nodes have bits none",
    ),
    "tokenizer-outside-the-bundle": (set_key(["tokenizer"], "../../tokenizer.json"), None, "tokenizer"),
    "dtype-a-list": (set_key(["dtype"], ["fp32"]), None, "dtype"),
    "source-not-an-object": (set_key(["source"], None), None, "source is None, not an object"),
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
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "nests arrays or objects too deeply to read" in result.output
    (tmp_path / "a_file").write_text("x")
    result = CliRunner().invoke(
        main, ["optimize", str(bundle), str(tmp_path / "a_file" / "sub"), "--target", "portable"]
    )
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert len(result.output.splitlines()) == 1


def test_a_quantization_claim_must_match_the_graphs_bits(bundle, tmp_path):
    from bigcode_deploy.workflows.optimize import optimize_bundle

    int8 = optimize_bundle(
        bundle, tmp_path / "int8", target="ort", quantize="int8", check=False, progress=lambda m: None
    )

    def claim_int4(manifest):
        manifest["quantization"].update(scheme="int4", bits=4)

    bad = edited(int8, tmp_path / "bad", claim_int4)
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 2 and "claims int4 quantization but the graph's MatMulNBits nodes have bits [8]" in (
        result.output
    )


# --- the graph's own references, the bytes ONNX Runtime loads, the position table, links, the tokenizer ----------


def with_external_data(bundle, dest, location=None, offset=None, manifest_data="model.onnx.data"):
    """A copy whose graph keeps its initializers in model.onnx.data; optionally the first external tensor's
    location or offset rewritten (a graph pointing elsewhere), with every sha256 updated to match."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="model.onnx.data")
    onnx.save_model(model, str(dest / "model.onnx"))  # writes model.onnx.data beside it
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    (dest / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    manifest["graph"]["external_data"] = manifest_data
    manifest["graph"]["sha256"] = {n: sha256_file(dest / n) for n in ["model.onnx", manifest_data] if n}
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest))
    return dest


def test_external_data_in_the_manifests_file_loads_from_the_verified_bytes(bundle, tmp_path):
    good = with_external_data(bundle, tmp_path / "ext")
    result = CliRunner().invoke(main, ["verify", str(good)])
    assert result.exit_code == 0 and "parity ok" in result.output, result.output


@pytest.mark.parametrize(
    "location, offset, manifest_data, message",
    [
        ("../outside.data", None, "model.onnx.data", "names external data '../outside.data'"),
        ("/etc/passwd", None, "model.onnx.data", "names external data '/etc/passwd'"),
        ("config.json", None, "model.onnx.data", "names external data 'config.json'"),
        (None, 10**9, "model.onnx.data", "lies outside model.onnx.data"),
        (None, None, None, "may reference only no external data"),
    ],
    ids=["parent-dir", "absolute", "another-bundle-file", "offset-past-the-end", "data-the-manifest-does-not-name"],
)
def test_a_graph_whose_external_data_leaves_the_manifests_file_is_refused(
    bundle, tmp_path, location, offset, manifest_data, message
):
    bad = with_external_data(bundle, tmp_path / "bad", location, offset, manifest_data)
    for command in (["verify", str(bad)], ["inspect", str(bad)], ["generate", str(bad), "--ids", "1,2"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and message in result.output, (command, result.output)
        assert len(result.output.strip().splitlines()) == 1 and isinstance(result.exception, SystemExit)


def test_onnx_runtime_loads_the_bytes_that_were_hashed(bundle, tmp_path):
    from bigcode_deploy.runtime.backends import open_backend
    from bigcode_deploy.runtime.bundle import Bundle
    from bigcode_deploy.runtime.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    opened = Bundle.open(copy)  # hashed and checked here
    graph = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(graph + b"\x00")  # changed between the check and the backend's load
    with pytest.raises(BundleError, match="does not match the sha256"):
        with open_backend(opened, "ort"):
            pass


def test_n_positions_beyond_the_graphs_position_table_is_refused(bundle, tmp_path):
    def longer_context(manifest):
        manifest["config"]["n_positions"] = 128
        for name, rng in manifest["dims"].items():
            if rng["max"] is not None:
                rng["max"] = 127 if name == "past_sequence" else 128

    bad = edited(bundle, tmp_path / "bad", longer_context)
    result = CliRunner().invoke(main, ["generate", str(bad), "--ids", "1,2"])
    assert result.exit_code == 2 and "config.n_positions is 128 but the graph's position table" in result.output
    assert "holds 64 rows" in result.output, result.output


@pytest.mark.parametrize("name", ["model.onnx", "reference_outputs.safetensors", "tokenizer.json"])
def test_a_file_linked_out_of_the_bundle_is_refused(bundle, tmp_path, name):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    if name == "tokenizer.json":
        (outside / name).write_text("{}")
        manifest = json.loads((bad / MANIFEST_FILE).read_text())
        manifest["tokenizer"] = name
        (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    else:
        shutil.move(bad / name, outside / name)
    (bad / name).symlink_to(outside / name)
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 2 and "outside the bundle directory" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_corrupt_tokenizer_is_a_bad_bundle_and_ids_do_not_need_it(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7')  # cut short
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["tokenizer"] = "tokenizer.json"
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(bad), "--prompt", "def f():", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "is not a tokenizer the tokenizers library reads" in result.output
    assert len(result.output.strip().splitlines()) == 1 and isinstance(result.exception, SystemExit)
    result = runner.invoke(main, ["generate", str(bad), "--ids", "1,2", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert all(t.isdigit() for t in result.stdout.splitlines()[0].split(",")), result.stdout  # ids in, ids out


def test_large_external_data_is_read_from_the_bundle_and_hashed_again(bundle, tmp_path, monkeypatch):
    """Above IN_MEMORY_DATA_LIMIT ONNX Runtime reads the data file from the bundle directory; a file changed while it
    loads is refused afterwards (the sha256 is checked again once the session exists)."""
    import onnxruntime

    from bigcode_deploy.runtime import bundle as bundle_module
    from bigcode_deploy.runtime.backends import open_backend
    from bigcode_deploy.runtime.bundle import Bundle
    from bigcode_deploy.runtime.errors import BundleError
    from bigcode_deploy.runtime.verify import verify_bundle

    monkeypatch.setattr(bundle_module, "IN_MEMORY_DATA_LIMIT", 0)
    ext = with_external_data(bundle, tmp_path / "ext")
    assert verify_bundle(ext, write=False).ok
    session = onnxruntime.InferenceSession

    def loading_while_changed(*args, **kwargs):
        created = session(*args, **kwargs)
        with open(ext / "model.onnx.data", "r+b") as f:  # a byte flipped while ONNX Runtime had the file open
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        return created

    monkeypatch.setattr(onnxruntime, "InferenceSession", loading_while_changed)
    with pytest.raises(BundleError, match="changed while ONNX Runtime loaded it"):
        with open_backend(Bundle.open(ext), "ort"):
            pass


def test_a_graph_whose_io_names_differ_from_the_manifest_is_refused_on_open(bundle, tmp_path):
    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    model = onnx.load(str(bad / "model.onnx"))
    model.graph.output[0].name = "logitz"
    (bad / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["graph"]["sha256"]["model.onnx"] = sha256_file(bad / "model.onnx")
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["inspect", str(bad)])  # inspect loads no backend: the check is Bundle.open's
    assert result.exit_code == 2 and "model.onnx's outputs (3: logitz" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
