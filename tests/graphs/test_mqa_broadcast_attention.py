import onnx_ir as ir
import pytest
from onnx import helper

from bigcode_deploy.graphs import mqa_broadcast_attention
from tests.graphs.helpers import (
    BOOL,
    FLOAT,
    B,
    D,
    E,
    H,
    S,
    T,
    assert_same_outputs,
    feeds_for,
    folded_mqa_model,
    load_ir,
    make_model,
    masked_softmax_function,
    masked_softmax_node,
    op_counts,
    random_feeds,
    run,
)


def test_rewrites_hand_built_folded_attention():
    model = folded_mqa_model(layers=2)
    feeds = random_feeds(model)
    before = run(model, feeds)
    matmuls = op_counts(model)[("", "MatMul")]
    assert mqa_broadcast_attention.apply(model) == (2, None)
    ops = op_counts(model)
    assert ops[("bigcode", "FusedMaskedSoftmax")] == 2 and ops[("", "MatMul")] == matmuls
    assert ops[("", "Reshape")] == 4  # per layer: Q into heads and the output back to (B, T, E); no row folding
    assert ("", "Expand") not in ops and ("", "Tile") not in ops
    softmaxes = [n for n in model.graph if n.op_type == "FusedMaskedSoftmax"]
    assert [n.attributes["scale"].value for n in softmaxes] == [1.0, 2.0]
    for node in softmaxes:
        qk = node.inputs[0].producer()
        assert qk.op_type == "MatMul" and qk.inputs[0].producer().attributes.get_ints("perm") == (0, 2, 1, 3)
        k = qk.inputs[1].producer()
        assert k.op_type == "Transpose" and k.inputs[0].producer().op_type == "Unsqueeze"
        assert node.inputs[1].producer().attributes.get_ints("perm") == (0, 2, 1, 3)
    assert len({n.inputs[1] for n in softmaxes}) == 1  # one mask transpose shared by both layers
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"key_perm": (1, 2, 0)}, "the key Transpose perm (1, 2, 0) where (0, 2, 1) is needed"),
        (
            {"scores_shape": (0, H, -1, S)},
            f"the scores Reshape gives (2, 4, 3, 5) where (batch, sequence, {H}, keys) is needed",
        ),
        ({"out_shape": (0, -1, D)}, f"the output Reshape gives (2, 12, 8) where (batch, sequence, {E}) is needed"),
    ],
    ids=["key-perm", "scores-reshape", "output-reshape"],
)
def test_near_miss_does_not_match(kwargs, reason):
    model = folded_mqa_model(**kwargs)
    ops = op_counts(model)
    assert mqa_broadcast_attention.apply(model) == (0, reason)
    assert op_counts(model) == ops


def test_graph_in_heads_form_does_not_match():
    # MHA-like: scores (B, H, T, S) straight from a MatMul, probabilities straight into the next one.
    nodes = [
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        masked_softmax_node("scores", "mask", "probs"),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]
    inputs = [
        ("q", FLOAT, [B, H, T, D]),
        ("k_t", FLOAT, [B, H, D, S]),
        ("v", FLOAT, [B, H, S, D]),
        ("mask", BOOL, [B, 1, T, S]),
    ]
    model = make_model(nodes, inputs, [("out", FLOAT, [B, H, T, D])], functions=[masked_softmax_function()])
    assert mqa_broadcast_attention.apply(model) == (
        0,
        "the bigcode::FusedMaskedSoftmax output feeds MatMul where Reshape -> MatMul -> Reshape (the folded-heads "
        "multi-query form) is needed",
    )


def test_graph_without_the_softmax_node():
    model = make_model([helper.make_node("Softmax", ["x"], ["y"])], [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 4])])
    assert mqa_broadcast_attention.apply(model) == (0, "no bigcode::FusedMaskedSoftmax node")


# --- on exported bundles --------------------------------------------------------------------------------------


def test_rewrites_folded_mqa_into_broadcast_heads(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    matmuls = op_counts(model)[("", "MatMul")]
    assert mqa_broadcast_attention.apply(model) == (2, None)
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
    assert mqa_broadcast_attention.apply(model) == (2, None)
    softmax = next(n for n in model.graph.all_nodes() if n.op_type == "FusedMaskedSoftmax")
    assert softmax.attributes["softmax_dtype"].value == 1  # FLOAT
    assert softmax.attributes["scale"].value == 1.0  # layer 0's unscale
    assert_same_outputs(before, run(model, feeds), atol=2e-3)


def test_mha_graph_does_not_match(tiny_bundles):
    model = load_ir(tiny_bundles["mha"])
    count, reason = mqa_broadcast_attention.apply(model)
    assert count == 0 and "the folded-heads multi-query form" in reason
