import onnx_ir as ir
from onnx import TensorProto, helper

from bigcode_deploy.graphs import fold_constants, inline_functions
from tests.graphs.helpers import assert_same_outputs, feeds_for, load_ir, make_model, op_counts, random_feeds, run

FLOAT = TensorProto.FLOAT


def test_folds_hand_built_constant_subgraph():
    nodes = [
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Constant", [], ["three"], value_float=3.0),
        helper.make_node("Mul", ["two", "three"], ["six"]),
        helper.make_node("Mul", ["x", "six"], ["y"]),
        helper.make_node("Neg", ["x"], ["unused"]),
    ]
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])])
    feeds = random_feeds(model)
    before = run(model, feeds)
    assert fold_constants.apply(model) == (4, None)  # the two Constants, their Mul, the unused Neg
    assert op_counts(model) == {("", "Mul"): 1}
    assert_same_outputs(before, run(model, feeds), atol=0)


def test_near_miss_nothing_constant_or_unused():
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Relu", ["sq"], ["y"])]
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])])
    assert fold_constants.apply(model) == (0, fold_constants.NOTHING)
    assert op_counts(model) == {("", "Mul"): 1, ("", "Relu"): 1}


# --- on exported bundles --------------------------------------------------------------------------------------


def test_folds_the_inlined_constants(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    inline_functions.apply(model)
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    nodes_before = sum(op_counts(model).values())
    removed, reason = fold_constants.apply(model)
    assert removed > 0 and reason is None and sum(op_counts(model).values()) == nodes_before - removed
    assert op_counts(model).get(("", "Constant"), 0) == 0  # the function bodies' scalar Constants are folded
    assert_same_outputs(before, run(model, feeds), atol=1e-6)
