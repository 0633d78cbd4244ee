import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bigcode_deploy.graphs import fold_constants, inline_functions, ort_fusions
from tests.graphs.helpers import (
    assert_same_outputs,
    feeds_for,
    load_ir,
    make_model,
    op_counts,
    random_feeds,
    run,
    tanh_gelu_model,
)

FLOAT = TensorProto.FLOAT


def test_fuses_hand_built_tanh_gelu():
    model = tanh_gelu_model()
    feeds = random_feeds(model)
    before = run(model, feeds)
    counts, reason = ort_fusions.apply(model)
    assert reason is None and counts["gelu"] == 1 and sum(counts.values()) == 1  # every fusion tried is listed
    assert op_counts(model) == {("com.microsoft", "FastGelu"): 1}
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


def test_near_miss_gelu_with_another_constant_is_left_alone():
    model = tanh_gelu_model(cubic=0.05)
    ops = op_counts(model)
    counts, reason = ort_fusions.apply(model)
    assert counts == {}
    assert reason.startswith("none of onnxscript's ORT fusions matched (tried ") and "gelu" in reason
    assert op_counts(model) == ops


def test_refuses_a_hand_built_graph_with_bigcode_nodes():
    nodes = [helper.make_node("FusedMaskedSoftmax", ["x", "m"], ["y"], domain="bigcode")]
    model = make_model(nodes, [("x", FLOAT, [2]), ("m", TensorProto.BOOL, [2])], [("y", FLOAT, [2])])
    with pytest.raises(ValueError, match="inline the bigcode functions first"):
        ort_fusions.apply(model)


# --- on exported bundles --------------------------------------------------------------------------------------


def test_fuses_layernorm_gelu_and_matmul_scales(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    inline_functions.apply(model)
    fold_constants.apply(model)
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    counts, reason = ort_fusions.apply(model)
    # 2 layers: ln_1, ln_2 per layer plus ln_f -> 5 residual adds fused; one tanh-GELU per layer.
    assert counts["skip_layer_normalization"] == 5 and counts["gelu"] == 2 and reason is None
    ops = op_counts(model)
    assert ops[("com.microsoft", "SkipLayerNormalization")] == 5 and ops[("com.microsoft", "FastGelu")] == 2
    assert ("", "Tanh") not in ops and ("", "Pow") not in ops
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


def test_refuses_a_graph_with_bigcode_nodes(tiny_bundles):
    with pytest.raises(ValueError, match="inline the bigcode functions first"):
        ort_fusions.apply(load_ir(tiny_bundles["mqa"]))
