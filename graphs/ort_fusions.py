"""Rule set: the fusions ONNX Runtime's own optimizer misses on this graph, from onnxscript's ort_fusions.

Measured on the exported default graph: ORT (ORT_ENABLE_ALL) fused 1 of 5 residual Add + LayerNormalization
pairs and none of the tanh-GELU subgraphs; onnxscript's optimize_for_ort fuses all of them
(com.microsoft SkipLayerNormalization, FastGelu) and folds transposes and scalar scales into FusedMatMul.
Pattern / check / rewrite are onnxscript's own fusion rules. Returns the count of each fusion that fired, and
when none did, the reason.

Attention stays in GPTBigCode's own folded-heads MatMul form (what inline_functions leaves): measured with
benchmarks/attention_candidates.py on this 2-core CPU (onnxruntime 1.32, 2 threads, one decode step of one
layer, 12 heads x 64, one K/V head, batch 1; another process was training on one core during the run):
    past 128:  folded 0.043 ms, GroupQueryAttention (kv_num_heads=1) 0.069 ms (1.61x), Attention-23 0.050 ms (1.18x)
    past 2048: folded 0.178 ms, GroupQueryAttention 0.455 ms (2.56x), Attention-23 0.291 ms (1.64x)
so no attention fusion is applied for the CPU provider.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from bigcode_deploy.runtime.manifest import DOMAIN

NAME = "ort_fusions"
MS_DOMAIN = "com.microsoft"


def apply(model: ir.Model) -> tuple[dict[str, int], str | None]:
    """({fusion name: count} for every fusion tried, 0 included; None), or ({}, the reason none fired).

    Raises ValueError for a graph that still has bigcode nodes (the pipeline inlines them first).
    """
    if any(node.domain == DOMAIN for node in model.graph.all_nodes()):
        raise ValueError(f"inline the {DOMAIN} functions first: ORT's fusions match standard ops")
    before = {(n.domain, n.op_type) for n in model.graph.all_nodes()}
    _, all_counts = optimize_for_ort(model)
    counts = dict(all_counts)
    fused_matmul = sum(1 for n in model.graph.all_nodes() if (n.domain, n.op_type) == (MS_DOMAIN, "FusedMatMul"))
    counts["fused_matmul"] = fused_matmul if (MS_DOMAIN, "FusedMatMul") not in before else 0
    if any(counts.values()):
        return counts, None
    return {}, f"none of onnxscript's ORT fusions matched (tried {', '.join(all_counts)}, fused_matmul)"
