import onnx_ir as ir
import pytest

from graphs import fold_constants, inline_functions, ort_fusions
from tests.graphs.conftest import assert_same_outputs, feeds_for, load_ir, op_counts, run


def test_fuses_layernorm_gelu_and_matmul_scales(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    inline_functions.apply(model)
    fold_constants.apply(model)
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    counts = ort_fusions.apply(model)
    # 2 layers: ln_1, ln_2 per layer plus ln_f -> 5 residual adds fused; one tanh-GELU per layer.
    assert counts["skip_layer_normalization"] == 5 and counts["gelu"] == 2
    ops = op_counts(model)
    assert ops[("com.microsoft", "SkipLayerNormalization")] == 5 and ops[("com.microsoft", "FastGelu")] == 2
    assert ("", "Tanh") not in ops and ("", "Pow") not in ops
    assert_same_outputs(before, run(model, feeds), atol=1e-5)


def test_refuses_a_graph_with_bigcode_nodes(tiny_bundles):
    with pytest.raises(ValueError, match="inline the bigcode functions first"):
        ort_fusions.apply(load_ir(tiny_bundles["mqa"]))
