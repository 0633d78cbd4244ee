import onnx_ir as ir

from graphs import inline_functions
from tests.graphs.conftest import assert_same_outputs, feeds_for, load_ir, op_counts, run


def test_inlines_every_bigcode_node_and_keeps_outputs(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    assert inline_functions.why_not(model) is None
    assert inline_functions.apply(model) == 4  # 2 layers x (softmax, cache merge)
    counts = op_counts(model)
    assert not any(domain == "bigcode" for domain, _ in counts)
    assert counts[("", "Softmax")] == 2 and counts[("", "Where")] == 2
    assert not model.functions and "bigcode" not in model.opset_imports
    assert_same_outputs(before, run(model, feeds), atol=0)


def test_does_not_apply_twice(tiny_bundles):
    model = load_ir(tiny_bundles["mha"])
    inline_functions.apply(model)
    assert inline_functions.why_not(model) == "the graph has no bigcode nodes"
    assert inline_functions.apply(model) == 0
