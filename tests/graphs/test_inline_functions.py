import onnx_ir as ir
from onnx import TensorProto, helper

from bigcode_deploy.graphs import inline_functions
from tests.graphs.helpers import (
    assert_same_outputs,
    feeds_for,
    load_ir,
    make_model,
    masked_softmax_function,
    masked_softmax_node,
    op_counts,
    random_feeds,
    run,
)

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def softmax_model(with_body: bool = True) -> ir.Model:
    """Two bigcode::FusedMaskedSoftmax nodes in a row (with the reference body attached when with_body)."""
    nodes = [masked_softmax_node("scores", "mask", "p", scale=2.0), masked_softmax_node("p", "mask", "probs")]
    inputs = [("scores", FLOAT, [2, 3, 5]), ("mask", BOOL, [2, 1, 5])]
    functions = [masked_softmax_function()] if with_body else []
    return make_model(nodes, inputs, [("probs", FLOAT, [2, 3, 5])], functions=functions)


def test_inlines_hand_built_bigcode_nodes():
    model = softmax_model()
    feeds = random_feeds(model)
    before = run(model, feeds)
    assert inline_functions.check(model)
    assert inline_functions.apply(model) == (2, None)
    ops = op_counts(model)
    assert not any(domain == "bigcode" for domain, _ in ops)
    assert ops[("", "Softmax")] == 2 and ops[("", "Where")] == 2
    assert not model.functions and "bigcode" not in model.opset_imports
    assert_same_outputs(before, run(model, feeds), atol=0)


def test_near_miss_without_function_body_is_left_alone():
    model = softmax_model(with_body=False)
    assert inline_functions.apply(model) == (0, "no function body for bigcode::FusedMaskedSoftmax")
    assert op_counts(model) == {("bigcode", "FusedMaskedSoftmax"): 2}


def test_graph_without_bigcode_nodes():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    assert inline_functions.apply(model) == (0, "the graph has no bigcode nodes")


# --- on exported bundles --------------------------------------------------------------------------------------


def test_inlines_every_bigcode_node_and_keeps_outputs(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    assert inline_functions.check(model)
    assert inline_functions.apply(model) == (4, None)  # 2 layers x (softmax, cache merge)
    counts = op_counts(model)
    assert not any(domain == "bigcode" for domain, _ in counts)
    assert counts[("", "Softmax")] == 2 and counts[("", "Where")] == 2
    assert not model.functions and "bigcode" not in model.opset_imports
    assert_same_outputs(before, run(model, feeds), atol=0)


def test_does_not_apply_twice(tiny_bundles):
    model = load_ir(tiny_bundles["mha"])
    inline_functions.apply(model)
    assert inline_functions.check(model).reason == "the graph has no bigcode nodes"
    assert inline_functions.apply(model) == (0, "the graph has no bigcode nodes")
