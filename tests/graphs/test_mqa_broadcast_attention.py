import onnx_ir as ir

from graphs import mqa_broadcast_attention
from tests.graphs.conftest import assert_same_outputs, feeds_for, load_ir, op_counts, run


def test_rewrites_folded_mqa_into_broadcast_heads(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    matmuls = op_counts(model)[("", "MatMul")]
    assert mqa_broadcast_attention.apply(model) == 2
    ops = op_counts(model)
    assert ops[("bigcode", "FusedMaskedSoftmax")] == 2 and ops[("", "MatMul")] == matmuls
    # Each QK^T MatMul now takes (B, H, T, D) x (B, 1, D, S): K is unsqueezed to one head, never expanded.
    assert ("", "Expand") not in ops and ("", "Tile") not in ops
    for node in model.graph.all_nodes():
        if node.op_type == "FusedMaskedSoftmax":
            qk = node.inputs[0].producer()
            assert qk.op_type == "MatMul"
            k = qk.inputs[1].producer()
            assert k.op_type == "Transpose" and k.inputs[0].producer().op_type == "Unsqueeze"
    # One mask transpose shared by both layers.
    masks = {node.inputs[1].name for node in model.graph.all_nodes() if node.op_type == "FusedMaskedSoftmax"}
    assert len(masks) == 1
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


def test_fp16_graph_keeps_fp32_softmax(tiny_bundles):
    model = load_ir(tiny_bundles["mqa-fp16"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    assert mqa_broadcast_attention.apply(model) == 2
    softmax = next(n for n in model.graph.all_nodes() if n.op_type == "FusedMaskedSoftmax")
    assert softmax.attributes["softmax_dtype"].value == 1  # FLOAT
    assert softmax.attributes["scale"].value == 1.0  # layer 0's unscale
    assert_same_outputs(before, run(model, feeds), atol=2e-3)


def test_mha_graph_does_not_match(tiny_bundles):
    model = load_ir(tiny_bundles["mha"])
    softmax = next(n for n in model.graph.all_nodes() if n.op_type == "FusedMaskedSoftmax")
    assert isinstance(mqa_broadcast_attention.match(softmax), str)
    assert mqa_broadcast_attention.apply(model) == 0
