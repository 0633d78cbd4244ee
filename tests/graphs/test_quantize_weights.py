import numpy as np
import onnx_ir as ir
import pytest

from exporter.progress import quiet
from graphs import fold_constants, inline_functions, ort_fusions, quantize_weights
from graphs.optimize import optimize_bundle
from exporter.errors import BigCodeError
from tests.graphs.conftest import feeds_for, load_ir, op_counts, run


# Mean abs logit change on the tiny std-0.2 test model (logits of magnitude ~2-4): measured 0.015 (int8) and 0.16
# (int4). Bounds: ~1.5x those, and int8 at least 4x tighter than int4.
ERRORS = {}


@pytest.mark.parametrize("scheme, max_mean_abs", [("int4", 0.25), ("int8", 0.025)])
def test_quantizes_every_weight_matmul_and_keeps_embeddings_exact(tiny_bundles, scheme, max_mean_abs):
    model = load_ir(tiny_bundles["mqa"])
    for rule in (inline_functions, fold_constants):
        rule.apply(model)
    ort_fusions.apply(model)
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    gathers = {n.inputs[0].name: n.inputs[0].const_value.numpy().copy()
               for n in model.graph.all_nodes() if n.op_type == "Gather" and n.inputs[0].const_value is not None}
    quantized, count = quantize_weights.apply(model, scheme)
    # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj) + the tied lm_head.
    assert count == 9 and op_counts(quantized)[("com.microsoft", "MatMulNBits")] == 9
    for node in quantized.graph.all_nodes():
        if node.op_type == "Gather" and node.inputs[0].name in gathers:
            np.testing.assert_array_equal(node.inputs[0].const_value.numpy(), gathers[node.inputs[0].name])
    after = run(quantized, feeds)
    error = np.abs(after["logits"] - before["logits"]).mean()
    assert 0 < error < max_mean_abs  # changed (quantized), but only a little
    ERRORS[scheme] = error
    if scheme == "int8" and "int4" in ERRORS:
        assert ERRORS["int8"] * 4 < ERRORS["int4"]


def test_quantize_is_for_fp32_ort_bundles(tiny_bundles, tmp_path):
    with pytest.raises(BigCodeError, match="--quantize is for the ort target"):
        optimize_bundle(tiny_bundles["mqa"], tmp_path / "q", target="portable", quantize="int8", progress=quiet)
    with pytest.raises(BigCodeError, match="quantizes an fp32 bundle's weights; this one is fp16"):
        optimize_bundle(tiny_bundles["mqa-fp16"], tmp_path / "q", target="ort", quantize="int8", progress=quiet)
