"""Rule (TensorRT): rewrite GPTBigCode's folded-heads MQA attention into the broadcast form TensorRT fuses.

Target (the export's form, one K/V head shared by H query heads folded into the rows):
    q3 = Reshape(q_scaled)                    (B, T*H, D)
    s  = Reshape(MatMul(q3, Transpose(k)))    (B, T, H, S)
    p  = bigcode::FusedMaskedSoftmax(s, mask) mask (B, T, 1, S)
    o  = Reshape(MatMul(Reshape(p), v))       (B, T, E)
Replacement (scale already on Q; K and V stay one head, [B, 1, S, D], never expanded to H copies):
    qh = Transpose(Reshape(q_scaled, [0, 0, H, D]), [0, 2, 1, 3])      (B, H, T, D)
    s  = MatMul(qh, Transpose(Unsqueeze(k, 1), [0, 1, 3, 2]))          (B, H, T, S)
    p  = bigcode::FusedMaskedSoftmax(s, Transpose(mask, [0, 2, 1, 3])) mask (B, 1, T, S), built once
    o  = Reshape(Transpose(MatMul(p, Unsqueeze(v, 1)), [0, 2, 1, 3]), [0, 0, E])
The softmax node keeps its attributes (per-layer unscale, fp32 softmax dtype), so numerics are unchanged up to
matmul summation order. MHA graphs are already in (B, H, T, D) form: the rule does not apply. Fires per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphs._ir import const_i64

DOMAIN, SOFTMAX = "bigcode", "FusedMaskedSoftmax"


@dataclass
class Match:
    first: ir.Node  # the Reshape of Q: new nodes go before it
    q_scaled: ir.Value  # (B, T, E)
    key: ir.Value  # (B, S, D)
    value: ir.Value  # (B, S, D)
    mask: ir.Value  # (B, T, 1, S)
    softmax: ir.Node
    out: ir.Value  # (B, T, E)
    heads: int
    head_dim: int


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    consumers = list(value.consumers())
    return consumers[0] if len(consumers) == 1 and consumers[0].op_type == op_type else None


def match(softmax: ir.Node) -> Match | str:
    """The matched attention around one softmax node, or the reason it does not match."""
    reshape_scores = softmax.inputs[0].producer()
    if reshape_scores is None or reshape_scores.op_type != "Reshape":
        return "scores are not a Reshape"
    matmul_qk = reshape_scores.inputs[0].producer()
    if matmul_qk is None or matmul_qk.op_type != "MatMul":
        return "scores are not a Reshape of a MatMul"
    reshape_q, transpose_k = (v.producer() for v in matmul_qk.inputs)
    if reshape_q is None or reshape_q.op_type != "Reshape":
        return "the query is not reshaped into folded rows"
    if transpose_k is None or transpose_k.op_type != "Transpose":
        return "the key is not transposed"
    key = transpose_k.inputs[0]
    if key.shape is None or len(key.shape) != 3:
        return "the key is not (B, S, D): not a multi-query graph"
    reshape_p = _only_consumer(softmax.outputs[0], "Reshape")
    matmul_pv = _only_consumer(reshape_p.outputs[0], "MatMul") if reshape_p else None
    reshape_out = _only_consumer(matmul_pv.outputs[0], "Reshape") if matmul_pv else None
    if reshape_out is None:
        return "the probabilities do not feed Reshape -> MatMul -> Reshape"
    q_scaled = reshape_q.inputs[0]
    head_dim, embed = key.shape[-1], (q_scaled.shape[-1] if q_scaled.shape is not None else None)
    if not isinstance(head_dim, int) or not isinstance(embed, int) or embed % head_dim:
        return "head_dim or the embedding width is not static"
    return Match(reshape_q, q_scaled, key, matmul_pv.inputs[1], softmax.inputs[1], softmax,
                 reshape_out.outputs[0], embed // head_dim, head_dim)


def apply(model: ir.Model) -> int:
    graph = model.graph
    matches = [m for node in list(graph.all_nodes())
               if node.domain == DOMAIN and node.op_type == SOFTMAX and isinstance(m := match(node), Match)]
    transposed_masks: dict[int, ir.Value] = {}
    for m in matches:
        tape = ir.tape.Tape()
        head_shape = const_i64(graph, [0, 0, m.heads, m.head_dim], f"mqa_head_shape_{m.heads}x{m.head_dim}")
        out_shape = const_i64(graph, [0, 0, m.heads * m.head_dim], f"mqa_out_shape_{m.heads * m.head_dim}")
        axis1 = const_i64(graph, [1], "mqa_kv_head_axis")
        q = tape.op("Transpose", [tape.op("Reshape", [m.q_scaled, head_shape])], {"perm": [0, 2, 1, 3]})  # (B, H, T, D)
        k = tape.op("Transpose", [tape.op("Unsqueeze", [m.key, axis1])], {"perm": [0, 1, 3, 2]})  # (B, 1, D, S)
        scores = tape.op("MatMul", [q, k])  # (B, H, T, S)
        if id(m.mask) not in transposed_masks:
            transposed_masks[id(m.mask)] = tape.op("Transpose", [m.mask], {"perm": [0, 2, 1, 3]})  # (B, 1, T, S)
        attrs = {name: attr.value for name, attr in m.softmax.attributes.items()}
        probs = tape.op(SOFTMAX, [scores, transposed_masks[id(m.mask)]], attrs, domain=DOMAIN)
        v = tape.op("Unsqueeze", [m.value, axis1])  # (B, 1, S, D)
        heads_out = tape.op("Transpose", [tape.op("MatMul", [probs, v])], {"perm": [0, 2, 1, 3]})  # (B, T, H, D)
        out = tape.op("Reshape", [heads_out, out_shape])  # (B, T, E)
        graph.insert_before(m.first, tape.nodes)
        m.out.replace_all_uses_with(out)
    if matches:
        RemoveUnusedNodesPass()(model)
    return len(matches)
