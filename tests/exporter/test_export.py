"""ONNX export: every task, MQA and MHA, fp32 and fp16, cached decoding, the custom ops, errors, atomicity."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bigcode_deploy.cli import export_to_onnx_main, main
from bigcode_deploy.exporter.export import export_bundle
from tests.helpers import left_padded_batch


def quiet(_message: str) -> None:
    pass


def export(model_dir, out_dir, **kwargs):
    return export_bundle(model_dir, out_dir, progress=quiet, **kwargs)


def node_counts(path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter((n.domain, n.op_type) for n in model.graph.node)


# --- the manifest is the contract: a driver that knows only json, numpy and onnxruntime -------------------------


def drive_from_manifest(bundle_dir, ids: np.ndarray, mask: np.ndarray, steps: int, next_tokens: list[np.ndarray]):
    """Prefill then cached steps using only manifest.json: what a C++ service would do. Returns outputs per step."""
    import onnxruntime as ort

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    session = ort.InferenceSession(str(bundle_dir / manifest["graph"]["file"]), providers=["CPUExecutionProvider"])
    kv = manifest["kv_cache"]
    np_dtype = {"float32": np.float32, "float16": np.float16}[kv["dtype"]]
    layers = range(kv["num_layers"])
    past_shape = [ids.shape[0] if d == "batch" else 0 if d == "past_sequence" else d for d in kv["past_shape"]]
    past = {kv["past_input"].format(layer=i): np.zeros(past_shape, np_dtype) for i in layers}
    output_names = [o["name"] for o in manifest["outputs"]]
    results = []
    for step in range(steps + 1):
        past_length = next(iter(past.values())).shape[kv["sequence_axis"]]
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions[:, past_length:], **past}
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        results.append(outputs)
        past = {kv["past_input"].format(layer=i): outputs[kv["present_output"].format(layer=i)] for i in layers}
        ids = next_tokens[step]
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    return results


def hf_decode(hf_model, ids, mask, steps, next_tokens=None):
    """The oracle: transformers' outputs and its greedy tokens (or next_tokens, teacher-forced) for the same
    prefill + cached steps."""
    outputs, tokens, past = [], [], None
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    for step in range(steps + 1):
        with torch.no_grad():
            out = hf_model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        outputs.append(out)
        past = out.past_key_values
        ids = out.logits[:, -1].float().argmax(-1, keepdim=True)
        if next_tokens is not None and step < steps:
            ids = torch.from_numpy(np.asarray(next_tokens[step])).reshape(-1, 1)
        tokens.append(ids.numpy())
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return outputs, tokens


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_causal_lm_graph_driven_from_manifest_matches_transformers(hf_checkpoint, tmp_path, multi_query):
    hf_model, model_dir = hf_checkpoint("causal-lm", multi_query=multi_query, n_layer=3)
    bundle = export(model_dir, tmp_path / "bundle")
    ids, mask = (t.numpy() for t in left_padded_batch(hf_model.config.vocab_size))
    expected, tokens = hf_decode(hf_model, ids, mask, steps=3)
    actual = drive_from_manifest(bundle, ids, mask, steps=3, next_tokens=tokens)
    for step, (e, a) in enumerate(zip(expected, actual)):
        np.testing.assert_allclose(a["logits"], e.logits.numpy(), atol=1e-4, rtol=0, err_msg=f"step {step} logits")
        for layer, present in enumerate(e.past_key_values):
            np.testing.assert_allclose(
                a[f"present.{layer}.key_value"],
                present.numpy(),
                atol=1e-4,
                rtol=0,
                err_msg=f"step {step} present {layer}",
            )
    # Past length 0 at the prefill, then 7, 8, 9.
    assert [a["present.0.key_value"].shape[-2] for a in actual] == [7, 8, 9, 10]


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_custom_ops_and_functions_present(hf_checkpoint, tmp_path, multi_query):
    _, model_dir = hf_checkpoint("causal-lm", multi_query=multi_query, n_layer=3)
    bundle = export(model_dir, tmp_path / "bundle")
    model = onnx.load(str(bundle / "model.onnx"))
    counts = node_counts(bundle / "model.onnx")
    assert counts[("bigcode", "FusedMaskedSoftmax")] == 3
    assert counts[("bigcode", "KVCacheMerge")] == 3
    assert {(f.domain, f.name) for f in model.functions} == {
        ("bigcode", "FusedMaskedSoftmax"),
        ("bigcode", "KVCacheMerge"),
    }
    assert {o.domain: o.version for o in model.opset_import}["bigcode"] == 1
    # The mask is built once per graph (one LessOrEqual for causality, one And with the padding mask).
    assert counts[("", "LessOrEqual")] == 1 and counts[("", "And")] == 1
    # No op collides with a standard ONNX op name (TensorRT dispatches on the name alone).
    standard = {s.name for s in onnx.defs.get_all_schemas()}
    assert not {f.name for f in model.functions} & standard
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["custom_ops"]["used"] == ["FusedMaskedSoftmax", "KVCacheMerge"]
    assert manifest["kv_cache"]["sequence_axis"] == (1 if multi_query else 2)


@pytest.mark.parametrize(
    "task, multi_query, main_shape",
    [
        ("base", True, lambda c, B, T: (B, T, c.n_embd)),
        ("sequence-classification", False, lambda c, B, T: (B, c.num_labels)),
        ("token-classification", True, lambda c, B, T: (B, T, c.num_labels)),
    ],
)
def test_other_tasks_match_transformers(hf_checkpoint, tmp_path, task, multi_query, main_shape):
    import onnxruntime as ort

    hf_model, model_dir = hf_checkpoint(task, multi_query=multi_query, pad_token_id=0, num_labels=3)
    bundle = export(model_dir, tmp_path / "bundle", task=task)
    manifest = json.loads((bundle / "manifest.json").read_text())
    ids, mask = (t.numpy() for t in left_padded_batch(hf_model.config.vocab_size))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if task == "base":
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        feeds["position_ids"] = positions
        feeds.update({f"past_key_values.{i}.key_value": np.zeros((3, 0, 16), np.float32) for i in range(2)})
    assert sorted(feeds) == sorted(i["name"] for i in manifest["inputs"])
    main = session.run([manifest["outputs"][0]["name"]], feeds)[0]
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    expected = (out.last_hidden_state if task == "base" else out.logits).numpy()
    assert main.shape == main_shape(hf_model.config, *ids.shape)
    np.testing.assert_allclose(main, expected, atol=1e-4, rtol=0)


def test_sequence_classification_pools_last_real_token_with_right_padding(hf_checkpoint, tmp_path):
    import onnxruntime as ort

    hf_model, model_dir = hf_checkpoint("sequence-classification", pad_token_id=0, num_labels=2)
    bundle = export(model_dir, tmp_path / "bundle", task="sequence-classification")
    ids, mask = (t.flip(1).numpy().copy() for t in left_padded_batch(hf_model.config.vocab_size))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_fp16_export_within_stated_tolerance(hf_checkpoint, tmp_path, multi_query):
    """Judged as the product judges fp16: against transformers' fp32 outputs, within REDUCED_PRECISION_FACTOR times
    the error of transformers' own fp16 model to them (plus half an fp16 ulp at the logits' magnitude)."""
    from bigcode_deploy.runtime.parity import REDUCED_PRECISION_FACTOR, ULP_AT_ONE

    hf_model, model_dir = hf_checkpoint("causal-lm", multi_query=multi_query, n_layer=4)
    bundle = export(model_dir, tmp_path / "bundle", dtype="fp16")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "float16"
    ids, mask = (t.numpy() for t in left_padded_batch(hf_model.config.vocab_size))
    expected32, tokens = hf_decode(hf_model, ids, mask, steps=3)
    expected16, _ = hf_decode(hf_model.to(torch.float16), ids, mask, steps=3, next_tokens=tokens)
    actual = drive_from_manifest(bundle, ids, mask, steps=3, next_tokens=tokens)
    real = [mask.astype(bool)] + [np.ones((len(ids), 1), dtype=bool)] * 3
    for e32, e16, a, r in zip(expected32, expected16, actual, real):
        assert a["logits"].dtype == np.float16
        reference = e32.logits.float().numpy()[r]
        ours = np.abs(a["logits"].astype(np.float32)[r] - reference)
        theirs = np.abs(e16.logits.float().numpy()[r] - reference)
        floor = ULP_AT_ONE["fp16"] / 2 * np.abs(reference).max()
        assert ours.max() <= REDUCED_PRECISION_FACTOR * theirs.max() + floor
        assert ours.mean() <= REDUCED_PRECISION_FACTOR * theirs.mean() + floor
        assert 0 < theirs.max() < 0.1  # the comparison is not vacuous: fp16 does differ from fp32, a little
        # Top-1 agreement on each row's last position.
        assert (a["logits"][:, -1].argmax(-1) == e32.logits[:, -1].float().argmax(-1).numpy()).all()


def test_no_cache_graph_has_no_past(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint("causal-lm")
    bundle = export(model_dir, tmp_path / "bundle", use_cache=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    assert [o["name"] for o in manifest["outputs"]] == ["logits"] and manifest["kv_cache"] is None
    assert node_counts(bundle / "model.onnx")[("bigcode", "KVCacheMerge")] == 0


def test_external_data_and_tokenizer_files(hf_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    _, model_dir = hf_checkpoint("causal-lm")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(
        ["def f(x): return x"] * 10, trainers.BpeTrainer(vocab_size=101, special_tokens=["<eot>"])
    )
    tokenizer.save(str(model_dir / "tokenizer.json"))
    bundle = export(model_dir, tmp_path / "bundle", external_data=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graph"]["external_data"] == "model.onnx.data"
    assert (bundle / "model.onnx.data").stat().st_size > (bundle / "model.onnx").stat().st_size
    assert set(manifest["graph"]["sha256"]) == {"model.onnx", "model.onnx.data"}
    assert manifest["tokenizer"] == "tokenizer.json" and (bundle / "tokenizer.json").is_file()
    assert set(manifest["source"]["sha256"]) == {"config.json", "model.safetensors"}


def test_export_check_catches_a_wrong_graph(hf_checkpoint, tmp_path, monkeypatch):
    """The check is not decorative: a graph whose softmax scale is off by 1% fails export and leaves nothing."""
    import bigcode_deploy.exporter.onnx_functions as functions
    from bigcode_deploy.runtime.parity import ParityError

    original = functions.masked_softmax_function

    def skewed():
        f = original()
        for node in f.node:
            if node.op_type == "Mul":
                node.input[1] = "scale_x_skewed"
        f.node.insert(3, onnx.helper.make_node("Mul", ["scale_x", "skew"], ["scale_x_skewed"]))
        f.node.insert(3, onnx.helper.make_node("CastLike", ["skew_f32", "x"], ["skew"]))
        f.node.insert(3, onnx.helper.make_node("Constant", [], ["skew_f32"], value_float=1.01))
        return f

    monkeypatch.setitem(functions.FUNCTIONS, "FusedMaskedSoftmax", skewed)
    _, model_dir = hf_checkpoint("causal-lm")
    with pytest.raises(
        ParityError, match="ONNX Runtime disagrees with the torch reference: parity failed at prefill on logits"
    ):
        export(model_dir, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == [model_dir]  # nothing half-written beside it


# --- CLI and error paths ---------------------------------------------------------------------------------------


def test_cli_export_default_model_then_inspect(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.output and "exporting to ONNX" in result.output  # progress is shown
    result = runner.invoke(main, ["inspect", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]["n_layer"]
    assert f"bigcode    FusedMaskedSoftmax           {layers}" in result.output
    assert f"past_key_values.{layers - 1}.key_value" in result.output
    # Same command under its second name; an existing OUT_DIR is refused without --force and replaced with it.
    result = runner.invoke(export_to_onnx_main, [str(tmp_path / "b")])
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    result = runner.invoke(export_to_onnx_main, [str(tmp_path / "b"), "--force", "--no-check"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "{tmp}/out"], "does not exist"),
        (["{tmp}/out", "--dtype", "bf16"], "bf16 cannot be checked on this device"),
        (["{tmp}/out", "--opset", "12"], "--opset 12 is not supported"),
    ],
)
def test_cli_export_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) <= 2  # progress line + error
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_bad_checkpoint_fails_without_half_written_bundle(hf_checkpoint, tmp_path):
    _, model_dir = hf_checkpoint("causal-lm")
    (model_dir / "model.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["export", str(model_dir), str(tmp_path / "out")])
    assert result.exit_code == 2 and "truncated or corrupt" in result.output
    assert not (tmp_path / "out").exists()


def test_bf16_export_unchecked_is_written(tmp_path):
    bundle = export(None, tmp_path / "b", dtype="bf16", check=False)
    model = onnx.load(str(bundle / "model.onnx"))
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
