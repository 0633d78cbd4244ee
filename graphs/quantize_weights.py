"""Rule (ort): weight-only quantization of every MatMul with a 2-D constant weight, lm_head included.

Done by ONNX Runtime's own quantizer (onnxruntime.quantization MatMulNBitsQuantizer) into com.microsoft
MatMulNBits, whose CPU kernel reads 4- or 8-bit blocks and, at accuracy_level 4, computes with int8
activations. The token embedding is a Gather, which the quantizer leaves alone, so embeddings stay exact
(the tied lm_head is a separate, pre-transposed initializer in the exported graph). Symmetric blocks of 32
along the input dimension.
Pattern: MatMul with a constant 2-D weight (a tied FusedMatMul(transB=1) is first turned into one). Check: there
is one. Rewrite: the quantizer. Fires once per MatMul quantized.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from bigcode_deploy.graphs._ir import fail, ok
from bigcode_deploy.runtime.manifest import QUANTIZATION_BITS

NAME = "quantize_weights"  # recorded as quantize_weights.<scheme>
BITS = QUANTIZATION_BITS
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path


def _untranspose_weights(model: ir.Model) -> int:
    """FusedMatMul(x, W, transB=1) with a constant 2-D W -> MatMul(x, W^T as its own initializer).

    ORT's fusions turn the tied lm_head into FusedMatMul over the embedding table; the quantizer handles plain
    MatMul only. The transposed copy is what gets quantized; the embedding Gather keeps the exact table.
    """
    count = 0
    graph = model.graph
    for node in list(graph.all_nodes()):
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
            continue
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        weight = node.inputs[1]
        if (
            attrs.get("transB", 0) != 1
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("transBatchA", 0)
            or attrs.get("transBatchB", 0)
            or weight.const_value is None
            or len(weight.shape) != 2
        ):
            continue
        name = f"{weight.name}.transposed"
        transposed = graph.initializers.get(name)
        if transposed is None:
            array = np.ascontiguousarray(weight.const_value.numpy().T)
            transposed = ir.val(name, const_value=ir.tensor(array, name=name))
            graph.register_initializer(transposed)
        matmul = ir.node("MatMul", [node.inputs[0], transposed], name=node.name)
        graph.insert_before(node, matmul)
        node.outputs[0].replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
        matmul.outputs[0].name, matmul.outputs[0].shape = node.outputs[0].name, node.outputs[0].shape
        matmul.outputs[0].type = node.outputs[0].type
        graph.remove(node, safe=True)
        count += 1
    return count


def pattern(model: ir.Model) -> list[ir.Node]:
    """The MatMuls the quantizer targets: a plain MatMul whose second input is a constant 2-D weight."""
    return [
        node
        for node in model.graph.all_nodes()
        if node.op_type == "MatMul"
        and node.domain == ""
        and node.inputs[1] is not None
        and node.inputs[1].const_value is not None
        and len(node.inputs[1].const_value.shape) == 2
    ]


def check(model: ir.Model, scheme: str) -> MatchResult:
    """Success when there is a MatMul with a constant 2-D weight to quantize; else the reason.

    Raises ValueError for an unknown scheme.
    """
    if scheme not in BITS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(BITS)}")
    if not pattern(model):
        return fail("no MatMul (or FusedMatMul with transB=1) has a constant 2-D weight")
    return ok()


def rewrite(model: ir.Model, scheme: str) -> ir.Model:
    """A new model whose weight MatMuls are com.microsoft MatMulNBits (the quantizer works on protos).

    Weights held as external data are read into memory first (in place): a serialized proto names only the data
    file's relative location, which the quantizer would resolve against the current directory, not the model's.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ir.external_data.load_to_model(model)  # each ExternalTensor reads its file by its own base_dir
    proto = ir.serde.serialize_model(model)
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs one line per node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            proto, bits=BITS[scheme], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
        )
        quantizer.process()
    finally:
        logger.setLevel(level)
    return ir.serde.deserialize_model(quantizer.model.model)


def apply(model: ir.Model, scheme: str) -> tuple[ir.Model, int, str | None]:
    """(new model, number of MatMuls quantized, None), or (the model, 0, the reason nothing was quantized).

    The input model's tied FusedMatMul(transB=1) nodes are turned into MatMuls first (in place).
    """
    if scheme not in BITS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(BITS)}")
    _untranspose_weights(model)
    result = check(model, scheme)
    if not result:
        return model, 0, result.reason
    candidates = len(pattern(model))
    quantized = rewrite(model, scheme)
    count = sum(1 for n in quantized.graph.all_nodes() if (n.domain, n.op_type) == ("com.microsoft", "MatMulNBits"))
    if not count:
        return quantized, 0, f"ONNX Runtime's MatMulNBitsQuantizer quantized none of the {candidates} weight MatMuls"
    return quantized, count, None
