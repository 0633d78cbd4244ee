"""The model's two signature optimizations as free functions that export as `bigcode::` custom nodes.

Eager mode computes the math (the reference semantics). Under torch.onnx.export each function emits one node
of the custom domain `bigcode` (version 1) instead; exporter.onnx_functions supplies the matching model-local
FunctionProto made of standard ONNX ops, so stock ONNX Runtime runs the graph and a backend with a native
kernel or plugin can claim the node. Names avoid standard ONNX op names: TensorRT's parser dispatches on the
op name alone.
"""

from __future__ import annotations

import torch

from bigcode_deploy.exporter.dtypes import onnx_type
from bigcode_deploy.runtime.manifest import DOMAIN, DOMAIN_VERSION, KV_CACHE_MERGE, MASKED_SOFTMAX


def fused_masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor, unscale: float, softmax_dtype: torch.dtype
) -> torch.Tensor:
    """softmax(where(mask, float(scores) * unscale, finfo.min)) in softmax_dtype, cast back to scores' dtype.

    scores: MQA (B, T, H, S), MHA (B, H, T, S); mask: bool, broadcast over heads. Masked slots take the softmax
    dtype's finfo.min through where(), not an additive -inf, as transformers does: a row with every key masked
    (a left-pad query) softmaxes to uniform weights rather than NaN.
    """
    mask_value = torch.finfo(softmax_dtype).min
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{MASKED_SOFTMAX}",
            (scores, mask),
            {"scale": float(unscale), "mask_value": float(mask_value), "softmax_dtype": onnx_type(softmax_dtype)},
            dtype=scores.dtype,
            shape=scores.shape,
            version=DOMAIN_VERSION,
        )
    x = scores.to(softmax_dtype)
    if unscale != 1.0:
        x = x * unscale
    x = torch.where(mask, x, torch.full([], mask_value, dtype=softmax_dtype, device=x.device))
    return torch.softmax(x, dim=-1).to(scores.dtype)


def merge_kv_cache(
    layer_past: torch.Tensor | None, key_value: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """present = concat(past, new K|V) on the sequence axis; key, value = split(present, head_dim, -1).

    layer_past: MQA (B, P, 2D), MHA (B, H, P, 2D) or None; key_value: the new tokens' (.., T, 2D).
    Returns present (.., P + T, 2D), key (.., P + T, D), value (.., P + T, D).
    """
    if layer_past is not None and torch.onnx.is_in_onnx_export():
        present_shape = (*layer_past.shape[:-2], layer_past.shape[-2] + key_value.shape[-2], 2 * head_dim)
        half_shape = (*present_shape[:-1], head_dim)
        present, key, value = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{KV_CACHE_MERGE}",
            (layer_past, key_value),
            {"head_dim": int(head_dim)},
            dtypes=(key_value.dtype,) * 3,
            shapes=(present_shape, half_shape, half_shape),
            version=DOMAIN_VERSION,
        )
        return present, key, value
    present = key_value if layer_past is None else torch.cat((layer_past, key_value), dim=-2)
    key, value = present.split((head_dim, head_dim), dim=-1)
    return present, key, value
