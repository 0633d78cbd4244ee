"""Rule (TensorRT): put the whole attention scale on Q and drop GPTBigCode's per-layer softmax unscale.

The export's half-precision form (the seed's, for QK^T products held in fp16):
    s = MatMul(shape_ops(Mul(q, c)), k_t)          c = 1 / ((layer + 1) * sqrt(head_dim)) on Q
    p = bigcode::FusedMaskedSoftmax(s, mask)       attribute scale = layer + 1, applied in fp32 after the upcast
TensorRT fuses MatMul -> Softmax -> MatMul into its attention kernels only when the scale sits on Q or K before the
first MatMul; a multiply after it (the unscale, inside the inlined softmax body) blocks the fusion for every layer
but the first. Its fused kernels accumulate QK^T in fp32, so the unscale is not needed there.
Pattern: each FusedMaskedSoftmax whose scores come from a MatMul whose first input is Mul(q, scalar constant),
possibly through Reshape/Transpose (the MQA broadcast form: Mul -> Reshape -> Transpose -> MatMul; MHA: Mul ->
MatMul). Check: the softmax scale is not already 1, the factor is one constant number, each node on the way has
that one consumer. Rewrite: the factor becomes c * scale (1 / sqrt(head_dim), in c's dtype) and the softmax's scale
1; a scalar commutes with Reshape and Transpose, so the math is unchanged. Fires per layer.
Numerics: the fp16 scores are now up to (layer + 1) times larger than the seed's, so on a runtime that stores
QK^T in fp16 they overflow past 65504 where the seed's would not; TensorRT's fused kernels keep them in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from bigcode_deploy.graphs._ir import fail, ok
from bigcode_deploy.runtime.manifest import DOMAIN, MASKED_SOFTMAX

NAME = "scale_on_query"
SHAPE_OPS = ("Reshape", "Transpose")  # ops a scalar factor commutes with
ALREADY_ONE = f"every {DOMAIN}::{MASKED_SOFTMAX} scale is already 1: no per-layer unscale to fold"


def pattern(model: ir.Model) -> list[ir.Node]:
    """The softmax nodes of the main graph that carry an unscale (scale attribute other than 1)."""
    return [
        node for node in model.graph if node.domain == DOMAIN and node.op_type == MASKED_SOFTMAX and _scale(node) != 1.0
    ]


def _scale(softmax: ir.Node) -> float:
    return float(softmax.attributes.get_float("scale", 1.0))


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant contents (an initializer or a Constant node's `value`), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        return attr.value.numpy() if attr is not None else None
    return None


def _single_consumer(value: ir.Value, consumer: ir.Node) -> bool:
    return list(value.consumers()) == [consumer] and not value.is_graph_output()


def match(softmax: ir.Node) -> tuple[ir.Node, int] | str:
    """(the Mul that scales Q, the index of its constant input) for one softmax node, or why there is none."""
    scores = softmax.inputs[0]
    matmul = scores.producer() if scores is not None else None
    if matmul is None or matmul.op_type != "MatMul" or not _single_consumer(scores, softmax):
        return f"the scores of {softmax.name} do not come from a MatMul used by the softmax alone"
    node, value = matmul, matmul.inputs[0]
    while True:
        producer = value.producer() if value is not None else None
        if producer is None or producer.domain != "" or not _single_consumer(value, node):
            return f"the query of {matmul.name} is not scaled by a Mul used by this attention alone"
        if producer.op_type == "Mul":
            break
        if producer.op_type not in SHAPE_OPS:
            return f"the query of {matmul.name} passes through {producer.op_type}, not only Reshape/Transpose, to a Mul"
        node, value = producer, producer.inputs[0]
    for index in (1, 0):
        factor = _constant(producer.inputs[index])
        if factor is not None and factor.size == 1 and np.issubdtype(factor.dtype, np.floating):
            return producer, index
    return f"the query Mul {producer.name} has no constant scalar factor"


def check(model: ir.Model) -> MatchResult:
    """Success when every softmax with an unscale can take it onto Q; else the first reason."""
    softmaxes = pattern(model)
    if not softmaxes:
        if any(n.domain == DOMAIN and n.op_type == MASKED_SOFTMAX for n in model.graph):
            return fail(ALREADY_ONE)
        return fail(f"no {DOMAIN}::{MASKED_SOFTMAX} node")
    for softmax in softmaxes:
        found = match(softmax)
        if isinstance(found, str):
            return fail(found)
    return ok()


def rewrite(model: ir.Model, softmax: ir.Node, mul: ir.Node, index: int) -> None:
    """Multiply the query factor by the softmax's scale (a new constant, in the factor's dtype) and set it to 1."""
    factor = _constant(mul.inputs[index])
    folded = (factor.astype(np.float64) * _scale(softmax)).astype(factor.dtype)  # (layer+1)/((layer+1)sqrt(D))
    name = f"{mul.outputs[0].name}_scale_on_query"
    value = ir.val(name, const_value=ir.tensor(folded, name=name))
    model.graph.register_initializer(value)
    mul.replace_input_with(index, value)
    softmax.attributes["scale"] = ir.AttrFloat32("scale", 1.0)


def apply(model: ir.Model) -> tuple[int, str | None]:
    """Fold every unscale that matches; (count, None), or (0, the reason none did). Softmaxes that do not match
    keep their unscale: `unfolded` lists them."""
    count = 0
    for softmax in pattern(model):
        found = match(softmax)
        if isinstance(found, tuple):
            rewrite(model, softmax, *found)
            count += 1
    return (count, None) if count else (0, check(model).reason)


def unfolded(model: ir.Model) -> list[str]:
    """Why each softmax that still carries an unscale could not take it onto Q (empty: none left)."""
    return [found for found in map(match, pattern(model)) if isinstance(found, str)]
