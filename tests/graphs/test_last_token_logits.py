import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from bigcode_deploy.graphs import last_token_logits
from tests.graphs.helpers import assert_same_outputs, feeds_for, load_ir, make_model, op_counts, run

B, T, E, V = 2, 4, 8, 11
FLOAT = TensorProto.FLOAT


def lm_head_model(bias: bool = False) -> ir.Model:
    """hidden (B, T, E) -> LayerNorm-free lm_head MatMul (+ an Add of a bias when bias) -> logits (B, T, V)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((E, V)).astype(np.float32), "lm_head")]
    nodes = [helper.make_node("MatMul", ["hidden", "lm_head"], ["mm" if bias else "logits"])]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(V).astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["logits"]))
    return make_model(
        nodes, [("hidden", FLOAT, ["batch", "sequence", E])], [("logits", FLOAT, ["batch", "sequence", V])], inits
    )


def test_slices_hand_built_lm_head_input():
    model = lm_head_model()
    feeds = {"hidden": np.random.default_rng(1).standard_normal((B, T, E)).astype(np.float32)}
    before = run(model, feeds)
    assert last_token_logits.apply(model) == (1, None)
    assert op_counts(model) == {("", "Slice"): 1, ("", "MatMul"): 1}
    after = run(model, feeds)
    assert after["logits"].shape == (B, 1, V)
    assert_same_outputs(before, after, atol=1e-6)
    assert last_token_logits.apply(model) == (0, "logits already cover the last position only")


def test_near_miss_logits_from_an_add_is_left_alone():
    model = lm_head_model(bias=True)
    assert last_token_logits.apply(model) == (0, "`logits` is produced by Add, not by a MatMul (the lm_head)")
    assert ("", "Slice") not in op_counts(model)


def test_graph_without_logits():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    assert last_token_logits.apply(model) == (0, "the graph has no `logits` output")
    assert op_counts(model) == {("", "Relu"): 1}


# --- on exported bundles --------------------------------------------------------------------------------------


def test_slices_the_last_position_before_the_lm_head(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    slices = op_counts(model).get(("", "Slice"), 0)
    assert last_token_logits.apply(model) == (1, None)
    assert op_counts(model)[("", "Slice")] == slices + 1
    after = run(model, feeds)
    assert after["logits"].shape == (2, 1, before["logits"].shape[-1])
    assert_same_outputs(before, after, atol=1e-6)  # logits compared at the last position; presents unchanged
    assert last_token_logits.check(model).reason == "logits already cover the last position only"
    assert last_token_logits.apply(model) == (0, "logits already cover the last position only")
