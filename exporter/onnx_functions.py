"""Model-local FunctionProtos for the `bigcode` custom ops: their reference bodies in standard ONNX ops.

A node `bigcode::FusedMaskedSoftmax` or `bigcode::KVCacheMerge` with one of these functions beside it runs on
stock ONNX Runtime (which inlines the body when no kernel claims the node); a backend with a native kernel or a
TensorRT plugin can claim the node instead. Written with onnx.helper: the bodies are a handful of nodes each,
and torch's exporter is not used for them because it inlines functions (see the notes on torch.onnx).
"""

from __future__ import annotations

import onnx
from onnx import helper

from bigcode_deploy.runtime.manifest import DOMAIN, KV_CACHE_MERGE, MASKED_SOFTMAX

# Standard-domain opset the bodies are written against (Split's num_outputs needs 18).
BODY_OPSET = 18


def _ref_attr(name: str, attr_type: int, as_name: str | None = None) -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name = as_name or name
    attr.ref_attr_name = name
    attr.type = attr_type
    return attr


def masked_softmax_function() -> onnx.FunctionProto:
    """FusedMaskedSoftmax(scores, mask) -> probs; attributes scale (float), mask_value (float), softmax_dtype (int).

    probs = CastLike(Softmax(Where(mask, Cast<softmax_dtype>(scores) * scale, mask_value), axis=-1), scores)
    """
    cast = helper.make_node("Cast", ["scores"], ["x"])
    cast.attribute.append(_ref_attr("softmax_dtype", onnx.AttributeProto.INT, as_name="to"))
    scale = helper.make_node("Constant", [], ["scale_f32"])
    scale.attribute.append(_ref_attr("scale", onnx.AttributeProto.FLOAT, as_name="value_float"))
    mask_value = helper.make_node("Constant", [], ["mask_value_f32"])
    mask_value.attribute.append(_ref_attr("mask_value", onnx.AttributeProto.FLOAT, as_name="value_float"))
    nodes = [
        cast,
        scale,
        helper.make_node("CastLike", ["scale_f32", "x"], ["scale_x"]),
        helper.make_node("Mul", ["x", "scale_x"], ["x_scaled"]),
        mask_value,
        helper.make_node("CastLike", ["mask_value_f32", "x"], ["mask_value_x"]),
        helper.make_node("Where", ["mask", "x_scaled", "mask_value_x"], ["x_masked"]),
        helper.make_node("Softmax", ["x_masked"], ["p"], axis=-1),
        helper.make_node("CastLike", ["p", "scores"], ["probs"]),
    ]
    return helper.make_function(
        DOMAIN,
        MASKED_SOFTMAX,
        ["scores", "mask"],
        ["probs"],
        nodes,
        [helper.make_opsetid("", BODY_OPSET)],
        attributes=["scale", "mask_value", "softmax_dtype"],
        doc_string="softmax(where(mask, float(scores) * scale, mask_value)) in softmax_dtype, cast back to the "
        "scores' dtype. scale is the per-layer unscale of GPTBigCode's half-precision path (1 in fp32).",
    )


def kv_cache_merge_function() -> onnx.FunctionProto:
    """KVCacheMerge(past, key_value) -> (present, key, value); attribute head_dim (int).

    present = Concat(past, key_value, axis=-2) (the sequence axis); key, value = Split(present, 2, axis=-1).
    """
    nodes = [
        helper.make_node("Concat", ["past", "key_value"], ["present"], axis=-2),
        helper.make_node("Split", ["present"], ["key", "value"], axis=-1, num_outputs=2),
    ]
    return helper.make_function(
        DOMAIN,
        KV_CACHE_MERGE,
        ["past", "key_value"],
        ["present", "key", "value"],
        nodes,
        [helper.make_opsetid("", BODY_OPSET)],
        attributes=["head_dim"],
        doc_string="The merged K|V cache update: present = concat(past, new K|V) on the sequence axis, split into "
        "K and V of head_dim each on the last axis. MQA (B, S, 2D); MHA (B, H, S, 2D).",
    )


FUNCTIONS = {MASKED_SOFTMAX: masked_softmax_function, KV_CACHE_MERGE: kv_cache_merge_function}
