"""scale_on_query: the per-layer softmax unscale folded into Q's factor (hand-built graphs, near misses), and its
numerics in fp16 on ONNX Runtime with attention scores in the thousands, judged against the fp32 torch reference
by the project's parity verdict."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from bigcode_deploy.graphs import fold_constants, inline_functions, scale_on_query
from bigcode_deploy.graphs.pipeline import run_passes
from bigcode_deploy.runtime.errors import BigCodeError, ParityError
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.verify import verify_bundle
from bigcode_deploy.workflows.optimize import optimize_bundle
from tests.graphs.helpers import (
    BOOL,
    FLOAT,
    B,
    D,
    H,
    S,
    T,
    assert_same_outputs,
    i64,
    make_model,
    masked_softmax_function,
    masked_softmax_node,
    op_counts,
    random_feeds,
    run,
)
from tests.helpers import make_hf_model

UNSCALE = 3.0  # the softmax scale of layer 2 in the export's half-precision form


def attention_model(scale=UNSCALE, factor_input=False, extra_use=False, between="Transpose") -> onnx.ModelProto:
    """Mul(q, c) -> Reshape -> Transpose -> MatMul(., k^T) -> FusedMaskedSoftmax(scale) -> MatMul(., v): the MQA
    broadcast form after mqa_broadcast_attention, with c = 1 / (scale * sqrt(D)) as exported.

    factor_input: c is a graph input (not a constant). extra_use: Q's scaled value is also a graph output.
    between: the op after the Reshape ("Transpose", or e.g. "Sin" for a near miss)."""
    c = helper.make_tensor("q_factor", FLOAT, [], [1.0 / (scale * math.sqrt(D))])
    heads = i64("heads", [0, 0, H, D])
    after_reshape = (
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3])
        if between == "Transpose"
        else helper.make_node(between, ["q4"], ["qh_raw"])
    )
    nodes = [
        helper.make_node("Mul", ["query", "q_factor"], ["q_scaled"]),
        helper.make_node("Reshape", ["q_scaled", "heads"], ["q4"]),  # (B, T, H, D)
        after_reshape,
    ]
    if between != "Transpose":
        nodes.append(helper.make_node("Transpose", ["qh_raw"], ["qh"], perm=[0, 2, 1, 3]))
    nodes += [
        helper.make_node("Transpose", ["key"], ["key_t"], perm=[0, 1, 3, 2]),  # (B, 1, D, S)
        helper.make_node("MatMul", ["qh", "key_t"], ["scores"]),  # (B, H, T, S)
        masked_softmax_node("scores", "mask", "probs", scale=scale),
        helper.make_node("MatMul", ["probs", "value"], ["out"]),  # (B, H, T, D)
    ]
    inputs = [
        ("query", FLOAT, [B, T, H * D]),
        ("key", FLOAT, [B, 1, S, D]),
        ("value", FLOAT, [B, 1, S, D]),
        ("mask", BOOL, [B, 1, T, S]),
    ]
    outputs = [("out", FLOAT, [B, H, T, D])] + ([("q_scaled", FLOAT, [B, T, H * D])] if extra_use else [])
    inits = [heads] if factor_input else [c, heads]
    if factor_input:
        inputs.append(("q_factor", FLOAT, []))
    return make_model(nodes, inputs, outputs, inits, [masked_softmax_function()])


def test_folds_the_unscale_into_the_query_factor():
    model = attention_model()
    feeds = random_feeds(model)
    before = run(model, feeds)
    assert scale_on_query.apply(model) == (1, None)
    softmax = next(n for n in model.graph if n.op_type == "FusedMaskedSoftmax")
    assert softmax.attributes["scale"].value == 1.0
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert mul.inputs[1].const_value.numpy() == pytest.approx(1 / math.sqrt(D), rel=1e-7)
    assert scale_on_query.unfolded(model) == []
    assert_same_outputs(before, run(model, feeds), atol=1e-5)
    # Inlined and folded, nothing multiplies the scores between the first MatMul and the Softmax.
    inline_functions.apply(model)
    fold_constants.apply(model)
    assert ("", "Mul") in op_counts(model) and ("", "Softmax") in op_counts(model)
    node = next(n for n in model.graph if n.op_type == "Softmax")
    path = []
    while node.op_type != "MatMul":
        path.append(node.op_type)
        node = node.inputs[1 if node.op_type == "Where" else 0].producer()
    assert "Mul" not in path, path
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(scale=1.0), scale_on_query.ALREADY_ONE),
        (dict(extra_use=True), "is not scaled by a Mul used by this attention alone"),
        (dict(factor_input=True), "has no constant scalar factor"),
        (dict(between="Sin"), "passes through Sin, not only Reshape/Transpose, to a Mul"),
    ],
    ids=["already-one", "scaled-q-used-elsewhere", "factor-not-constant", "other-op-on-the-way"],
)
def test_near_misses_do_not_fold_and_say_why(kwargs, reason):
    model = attention_model(**kwargs)
    count, why = scale_on_query.apply(model)
    assert count == 0 and reason in why
    scales = [n.attributes["scale"].value for n in model.graph if n.op_type == "FusedMaskedSoftmax"]
    assert scales == [kwargs.get("scale", UNSCALE)]  # untouched


def test_the_tensorrt_pipeline_refuses_an_unscale_it_cannot_fold():
    with pytest.raises(BigCodeError, match="would keep a per-layer softmax unscale after 1 attention"):
        run_passes(attention_model(factor_input=True), "tensorrt")
    records = run_passes(attention_model(), "tensorrt")
    assert [(r.name, r.count) for r in records[:2]] == [("mqa_broadcast_attention", 0), ("scale_on_query", 1)]


# --- numerics: fp16 on ONNX Runtime, scores in the thousands, against the fp32 torch reference ------------------
QK_GAIN = 40.0  # on the q and k rows of c_attn: QK^T / sqrt(D) grows by 1600x, into the thousands


def _large_scores_checkpoint(path):
    """A 3-layer MQA checkpoint whose attention scores (QK^T / sqrt(D)) reach the thousands; returns the largest
    |score| of layer 0 on a random prompt (torch fp32)."""
    model = make_hf_model("causal-lm", seed=5, n_layer=3)
    E, Dh = model.config.n_embd, model.config.n_embd // model.config.n_head
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[: E + Dh] *= QK_GAIN  # MQA c_attn rows: [q (E) | k (D) | v (D)]
            block.attn.c_attn.bias[: E + Dh] *= QK_GAIN
        model.save_pretrained(path)
        ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(12)
        hidden = model.transformer.h[0].ln_1(model.transformer.wte(ids) + model.transformer.wpe(pos))
        q, k, _ = model.transformer.h[0].attn.c_attn(hidden).split((E, Dh, Dh), dim=-1)  # (1, 12, E), (1, 12, D)
        scores = q.view(1, 12, -1, Dh).transpose(1, 2) @ k.transpose(-1, -2).unsqueeze(1) / math.sqrt(Dh)
    return float(scores.abs().max())


@pytest.fixture(scope="module")
def large_scores_bundle(tmp_path_factory):
    from bigcode_deploy.exporter.export import export_bundle

    root = tmp_path_factory.mktemp("scale_on_query")
    largest = _large_scores_checkpoint(root / "ckpt")
    bundle = export_bundle(root / "ckpt", root / "fp16", dtype="fp16", check=False, progress=quiet)
    return bundle, largest


def test_scale_on_query_keeps_fp16_parity_with_large_scores(large_scores_bundle, tmp_path):
    bundle, largest = large_scores_bundle
    assert 1_000 < largest < 30_000  # in the thousands, and within fp16's range without the unscale
    out = optimize_bundle(bundle, tmp_path / "trt", target="tensorrt", progress=quiet)  # checks parity itself
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention_scale"] == "query" and manifest["logits_positions"] == "last"
    fired = {p["name"]: p["count"] for p in manifest["passes"]}
    assert fired["scale_on_query"] == 2  # layers 1 and 2 (layer 0's unscale is already 1)
    assert json.loads((bundle / "manifest.json").read_text())["attention_scale"] == "softmax-unscale"
    report = verify_bundle(out, write=False)
    assert report.ok, report.table()
    assert all(s.top1 == 1.0 for s in report.steps)


def test_a_wrong_fold_fails_the_same_verdict(large_scores_bundle, tmp_path, monkeypatch):
    """The verdict can fail here: a fold that drops the unscale without moving it onto Q is refused."""
    bundle, _ = large_scores_bundle

    def drop_unscale(model, softmax, mul, index):
        softmax.attributes["scale"] = scale_on_query.ir.AttrFloat32("scale", 1.0)

    monkeypatch.setattr(scale_on_query, "rewrite", drop_unscale)
    with pytest.raises(ParityError):
        optimize_bundle(bundle, tmp_path / "wrong", target="tensorrt", progress=quiet)
    assert not (tmp_path / "wrong").exists()
    np.testing.assert_equal(list(tmp_path.iterdir()), [])
