import onnx_ir as ir

from graphs import fold_constants, inline_functions
from tests.graphs.conftest import assert_same_outputs, feeds_for, load_ir, op_counts, run


def test_folds_the_inlined_constants(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    inline_functions.apply(model)
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    nodes_before = sum(op_counts(model).values())
    removed = fold_constants.apply(model)
    assert removed > 0 and sum(op_counts(model).values()) == nodes_before - removed
    assert op_counts(model).get(("", "Constant"), 0) == 0  # the function bodies' scalar Constants are folded
    assert_same_outputs(before, run(model, feeds), atol=1e-6)
