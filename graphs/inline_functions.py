"""Rule: inline the `bigcode` custom ops into their reference bodies (standard ONNX ops).

For consumers without a kernel or plugin for the custom ops: any ONNX runtime can then run the graph, and
later passes (ORT's fusions, the TensorRT attention form) see plain ops. Fires once per bigcode node.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass

DOMAIN = "bigcode"


def why_not(model: ir.Model) -> str | None:
    """None when the rule applies; else the reason it does not."""
    if not any(node.domain == DOMAIN for node in model.graph.all_nodes()):
        return "the graph has no bigcode nodes"
    missing = {n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN} - {
        name for (domain, name, _) in model.functions if domain == DOMAIN
    }
    if missing:
        return f"no function body for bigcode::{sorted(missing)[0]}"
    return None


def apply(model: ir.Model) -> int:
    if why_not(model):
        return 0
    count = sum(1 for node in model.graph.all_nodes() if node.domain == DOMAIN)
    InlinePass()(model)
    for key in [k for k in model.functions if k[0] == DOMAIN]:
        del model.functions[key]
    RemoveUnusedOpsetsPass()(model)
    return count
