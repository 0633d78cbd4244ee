"""Rule (ort): weight-only quantization of every MatMul with a 2-D constant weight, lm_head included.

Done by ONNX Runtime's own quantizer (onnxruntime.quantization MatMulNBitsQuantizer) into com.microsoft
MatMulNBits, whose CPU kernel reads 4- or 8-bit blocks and, at accuracy_level 4, computes with int8
activations. The token embedding is a Gather, which the quantizer leaves alone, so embeddings stay exact
(the tied lm_head is a separate, pre-transposed initializer in the exported graph). Symmetric blocks of 32
along the input dimension. Fires once per MatMul quantized.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

BITS = {"int8": 8, "int4": 4}
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
        if (attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0)
                or weight.const_value is None or len(weight.shape) != 2):
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


def apply(model: ir.Model, scheme: str) -> tuple[ir.Model, int]:
    """Returns a new model (the quantizer works on protos) and the number of MatMuls quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if scheme not in BITS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(BITS)}")
    _untranspose_weights(model)
    proto = ir.serde.serialize_model(model)
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs one line per node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=BITS[scheme], block_size=BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
    finally:
        logger.setLevel(level)
    quantized = quantizer.model.model
    count = sum(1 for n in quantized.graph.node if n.op_type == "MatMulNBits")
    return ir.serde.deserialize_model(quantized), count
