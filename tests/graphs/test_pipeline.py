import onnx_ir as ir
import pytest
from onnx import helper

from bigcode_deploy.graphs import fold_constants, inline_functions, ort_fusions, scale_on_query
from bigcode_deploy.graphs.pipeline import run_passes
from bigcode_deploy.runtime.manifest import PassRecord
from tests.graphs.helpers import (
    FLOAT,
    assert_same_outputs,
    folded_mqa_model,
    make_model,
    op_counts,
    random_feeds,
    run,
    tanh_gelu_model,
)


def test_tensorrt_passes_record_counts_and_no_reason_when_fired():
    model = folded_mqa_model(layers=2)
    for node in model.graph:  # this hand-built graph has no Q factor to take an unscale (test_scale_on_query.py)
        if node.op_type == "FusedMaskedSoftmax":
            node.attributes["scale"] = ir.AttrFloat32("scale", 1.0)
    feeds = random_feeds(model)
    before = run(model, feeds)
    records = run_passes(model, "tensorrt")
    names = ["mqa_broadcast_attention", "scale_on_query", "inline_functions", "fold_constants"]
    assert [r.name for r in records] == names
    assert records[:3] == [
        PassRecord("mqa_broadcast_attention", 2),
        PassRecord("scale_on_query", 0, scale_on_query.ALREADY_ONE),
        PassRecord("inline_functions", 2),
    ]
    assert records[3].count > 0 and records[3].reason is None
    assert not any(domain == "bigcode" for domain, _ in op_counts(model))
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


def test_passes_that_did_not_fire_record_their_reason():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    records = run_passes(model, "tensorrt", last_token_only=True)
    assert records == [
        PassRecord("mqa_broadcast_attention", 0, "no bigcode::FusedMaskedSoftmax node"),
        PassRecord("scale_on_query", 0, "no bigcode::FusedMaskedSoftmax node"),
        PassRecord("inline_functions", 0, "the graph has no bigcode nodes"),
        PassRecord("last_token_logits", 0, "the graph has no `logits` output"),
        PassRecord("fold_constants", 0, fold_constants.NOTHING),
    ]


def test_ort_records_one_pass_per_fusion_or_one_reason():
    records = [r for r in run_passes(tanh_gelu_model(), "ort") if r.name.startswith(ort_fusions.NAME)]
    assert PassRecord(f"{ort_fusions.NAME}.gelu", 1) in records
    assert all(r.reason and "found no match" in r.reason for r in records if r.count == 0) and len(records) > 1
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    last = run_passes(model, "ort")[-1]
    assert last.name == "ort_fusions" and last.count == 0 and last.reason.startswith("none of onnxscript's ORT")


def test_portable_runs_no_target_rule():
    records = run_passes(folded_mqa_model(), "portable")
    assert [r.name for r in records] == [inline_functions.NAME, fold_constants.NAME]


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target 'gpu'"):
        run_passes(tanh_gelu_model(), "gpu")
