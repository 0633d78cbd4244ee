"""runtime/: decoding sessions, sampling, generation, verify, and bundle errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.backends import OrtBackend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.manifest import FORMAT_VERSION
from bigcode_deploy.runtime.session import ContextOverflow
from bigcode_deploy.runtime.verify import verify_bundle
from bigcode_deploy.workflows.backends import open_any_backend
from bigcode_deploy.workflows.verify import verify_bundle_live
from tests.helpers import make_hf_model

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [12, 7, 33], [71]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ckpt") / "model"
    make_hf_model("causal-lm", seed=1, n_layer=3).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def bundles(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        dtype: export_bundle(checkpoint, root / dtype, dtype=dtype, check=False, progress=lambda m: None)
        for dtype in ("fp32", "fp16")
    }


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("reference", ["stored", "live"])
def test_verify_parity_per_dtype(bundles, checkpoint, dtype, reference):
    if reference == "stored":
        report = verify_bundle(bundles[dtype])
    else:
        report = verify_bundle_live(bundles[dtype], model_dir=checkpoint, steps=4)
    assert report.ok, report.table()
    assert len(report.steps) == 5  # prefill + 4 cached decode steps
    assert all(s.top1 == 1.0 for s in report.steps)
    assert report.greedy_first_divergence is None
    assert [o.name for o in report.steps[0].outputs] == ["logits", "present.0", "present.1", "present.2"]
    saved = json.loads((bundles[dtype] / "parity.json").read_text())
    assert saved["ok"] is True and saved["dtype"] == dtype and len(saved["steps"]) == 5
    assert saved["reference"] == ("stored" if reference == "stored" else f"live torch {checkpoint}")
    assert saved["graph_sha256"] == Bundle.open(bundles[dtype]).manifest.graph.sha256


def test_verify_refuses_another_checkpoint_as_the_reference(bundles, tmp_path):
    """A live reference from a checkpoint other than the one exported would judge the graph against another model:
    it is refused by sha256 before anything runs (a graph that disagrees with its own reference fails parity:
    tests/runtime/test_stored_reference.py)."""
    other = tmp_path / "other"
    make_hf_model("causal-lm", seed=2, n_layer=3).save_pretrained(other)
    result = CliRunner().invoke(main, ["verify", str(bundles["fp32"]), "--model", str(other), "--steps", "1"])
    assert result.exit_code == 2
    assert "is not the checkpoint the bundle was exported from" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_mixed_length_batch_equals_each_row_alone(bundles):
    with open_generator(bundles["fp32"]) as g:
        batched = g.generate(PROMPTS, max_new_tokens=6, stop_token_ids=())
        alone = [g.generate([p], max_new_tokens=6, stop_token_ids=())[0] for p in PROMPTS]
        session = g.session()
        batch_logits = session.prefill(PROMPTS)
        row_logits = [g.session().prefill([p])[0] for p in PROMPTS]
    assert batched == alone
    for b, r in zip(batch_logits, row_logits):
        np.testing.assert_allclose(b, r, atol=1e-4)


def test_ort_and_torch_backends_agree_on_greedy_tokens(bundles):
    with open_generator(bundles["fp32"]) as g:
        ort_tokens = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())
    with open_generator(bundles["fp32"], backend="torch", opener=open_any_backend) as g:
        torch_tokens = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())
    assert ort_tokens == torch_tokens


def test_top_k_1_equals_greedy_and_seeds_reproduce(bundles):
    with open_generator(bundles["fp32"]) as g:
        greedy = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())
        top1 = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), temperature=1.0, top_k=1, seed=5)
        a = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), temperature=1.0, top_p=0.9, seed=7)
        b = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), temperature=1.0, top_p=0.9, seed=7)
        c = g.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), temperature=1.0, top_p=0.9, seed=8)
    assert top1 == greedy
    assert a == b
    assert a != c  # 24 sampled tokens from a ~100-token vocabulary: equal only by a vanishing chance


def test_stop_token_ends_one_row_others_continue(bundles):
    with open_generator(bundles["fp32"]) as g:
        free = g.generate(PROMPTS, max_new_tokens=6, stop_token_ids=())
        stop = free[0][0]
        assert all(stop not in row for row in free[1:]), "pick prompts whose other rows avoid the stop token"
        events = list(g.stream(PROMPTS, max_new_tokens=6, stop_token_ids=(stop,)))
    rows = [[e.token for e in events if e.row == r] for r in range(3)]
    assert rows[0] == [stop]
    assert rows[1] == free[1] and rows[2] == free[2]
    assert [e.finished for e in events if e.row == 0] == [True]


def test_finished_rows_stop_consuming_work(bundles):
    batch_sizes = []

    class Counting(OrtBackend):
        def step(self, input_ids, attention_mask, position_ids, cache):
            batch_sizes.append(input_ids.shape[0])
            return super().step(input_ids, attention_mask, position_ids, cache)

    bundle = Bundle.open(bundles["fp32"])
    with Counting(bundle) as backend:
        from bigcode_deploy.runtime.api import Generator

        g = Generator(bundle, backend)
        free = g.generate(PROMPTS, max_new_tokens=5, stop_token_ids=())
        g.generate(PROMPTS, max_new_tokens=5, stop_token_ids=(free[0][0],))
    # First call: prefill of 3 rows and 4 steps of 3; second: row 0 stops after the prefill's token.
    assert batch_sizes == [3] * 5 + [3] + [2] * 4


def test_context_overflow_is_an_error_before_any_work(bundles):
    with open_generator(bundles["fp32"]) as g:
        with pytest.raises(ContextOverflow, match="exceeds the model's context of 64 positions"):
            g.generate([[1] * 60], max_new_tokens=5)
    result = CliRunner().invoke(main, ["generate", str(bundles["fp32"]), "--ids", "1,2,3", "--max-new-tokens", "62"])
    assert result.exit_code == 2 and "exceeds the model's context" in result.output


def test_cli_generate_streams_ids_and_rejects_text_without_tokenizer(bundles):
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(bundles["fp32"]), "--ids", "5,17,42", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    with open_generator(bundles["fp32"]) as g:
        expected = g.generate([[5, 17, 42]], max_new_tokens=4)[0]
    assert result.output.splitlines()[0] == ",".join(map(str, expected))
    assert "tokens/s" in result.output
    result = runner.invoke(main, ["generate", str(bundles["fp32"]), "--prompt", "def f():"])
    assert result.exit_code == 2 and "has no tokenizer.json" in result.output


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "model.onnx").unlink(), "model.onnx is missing from the bundle"),
        (lambda b: (b / "manifest.json").unlink(), "manifest.json is missing"),
        (
            lambda b: (b / "manifest.json").write_text(
                (b / "manifest.json").read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99')
            ),
            "format_version 99",
        ),
        (
            lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"\0"),
            "does not match the sha256",
        ),
    ],
    ids=["missing-graph", "missing-manifest", "other-format-version", "graph-hash-mismatch"],
)
def test_bad_bundle_is_one_clear_line(bundles, tmp_path, damage, message):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(bundles["fp32"], bundle)
    damage(bundle)
    result = CliRunner().invoke(main, ["generate", str(bundle), "--ids", "1,2"])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_bf16_bundle_on_ort_cpu_is_one_clear_line(checkpoint, tmp_path):
    bundle = export_bundle(checkpoint, tmp_path / "b", dtype="bf16", check=False, progress=lambda m: None)
    result = CliRunner().invoke(main, ["generate", str(bundle), "--ids", "1,2"])
    assert result.exit_code == 2 and "no bf16 kernels" in result.output


def test_sampling_filters():
    from bigcode_deploy.runtime.sampling import apply_repetition_penalty, filter_top_k_top_p

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.79)).tolist() == [[True, True, False, False]]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.81)).tolist() == [[True, True, True, False]]
    penalized = apply_repetition_penalty(np.array([[2.0, -2.0, 1.0]]), [np.array([0, 1])], 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]
