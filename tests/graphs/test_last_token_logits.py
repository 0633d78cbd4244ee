import onnx_ir as ir

from graphs import last_token_logits
from tests.graphs.conftest import assert_same_outputs, feeds_for, load_ir, op_counts, run


def test_slices_the_last_position_before_the_lm_head(tiny_bundles):
    model = load_ir(tiny_bundles["mqa"])
    feeds = feeds_for(ir.serde.serialize_model(model))
    before = run(model, feeds)
    slices = op_counts(model).get(("", "Slice"), 0)
    assert last_token_logits.apply(model) == 1
    assert op_counts(model)[("", "Slice")] == slices + 1
    after = run(model, feeds)
    assert after["logits"].shape == (2, 1, before["logits"].shape[-1])
    assert_same_outputs(before, after, atol=1e-6)  # logits compared at the last position; presents unchanged
    assert last_token_logits.why_not(model) == "logits already cover the last position only"
    assert last_token_logits.apply(model) == 0
