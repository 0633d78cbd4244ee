"""Rule set: the fusions ONNX Runtime's own optimizer misses on this graph, from onnxscript's ort_fusions.

Measured on the exported default graph: ORT (ORT_ENABLE_ALL) fused 1 of 5 residual Add + LayerNormalization
pairs and none of the tanh-GELU subgraphs; onnxscript's optimize_for_ort fuses all of them
(com.microsoft SkipLayerNormalization, FastGelu) and folds transposes and scalar scales into FusedMatMul.
Returns the count of each fusion that fired.

Attention stays in GPTBigCode's own folded-heads MatMul form (what inline_functions leaves): measured with
benchmarks/attention_candidates.py on this 2-core CPU (onnxruntime 1.32, 2 threads, one decode step of one
layer, 12 heads x 64, one K/V head, batch 1; another process was training on one core during the run):
    past 128:  folded 0.043 ms, GroupQueryAttention (kv_num_heads=1) 0.069 ms (1.61x), ONNX Attention-23 0.050 ms (1.18x)
    past 2048: folded 0.178 ms, GroupQueryAttention 0.455 ms (2.56x), ONNX Attention-23 0.291 ms (1.64x)
so no attention fusion is applied for the CPU provider.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort


def apply(model: ir.Model) -> dict[str, int]:
    if any(node.domain == "bigcode" for node in model.graph.all_nodes()):
        raise ValueError("inline the bigcode functions first: ORT's fusions match standard ops")
    before = {(n.domain, n.op_type) for n in model.graph.all_nodes()}
    _, counts = optimize_for_ort(model)
    counts = {name: n for name, n in counts.items() if n}
    fused_matmul = sum(1 for n in model.graph.all_nodes() if n.op_type == "FusedMatMul")
    if fused_matmul and ("com.microsoft", "FusedMatMul") not in before:
        counts["fused_matmul"] = fused_matmul
    return counts
